"""Reading key state from a real source redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from redis.exceptions import ResponseError

from rrb_streams.errors import DependencyError
from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire.source import Source
from tests.support.servers import RedisServer, free_port


@pytest.fixture
async def source(redis_server: RedisServer) -> AsyncIterator[Source]:
    s = Source(redis_server.url())
    await s.check()
    yield s
    await s.close()


def server_us(redis_server: RedisServer) -> int:
    with redis_server.client() as c:
        sec, usec = c.time()
        return int(sec) * 1_000_000 + int(usec)


@pytest.mark.anyio
async def test_source_reads_type_payload_and_exact_expiry_in_one_snapshot(
    redis_server: RedisServer, source: Source
) -> None:
    with redis_server.client() as c:
        c.set("s", "v", px=654_321)
        c.hset("h", mapping={"f": "1"})
        c.rpush("l", "a", "b")
        c.sadd("set", "x")
        c.zadd("z", {"m": 2.5})
        c.xadd("x", {"f": "v"})
        expected_expiry = int(c.execute_command("PEXPIRETIME", "s"))
        dumps = {k: c.dump(k) for k in ("s", "h", "l", "set", "z", "x")}
    before = server_us(redis_server)
    keys = [b"s", b"h", b"l", b"set", b"z", b"x"]
    records = await source.read(0, keys, [f"1-{i}" for i in range(len(keys))])
    after = server_us(redis_server)
    recs = [r for r in records if isinstance(r, KeyRecord)]
    assert len(recs) == len(keys)
    assert [r.type for r in recs] == ["string", "hash", "list", "set", "zset", "stream"]
    for i, (key, rec) in enumerate(zip(keys, recs, strict=True)):
        assert rec.key == key and rec.db == 0 and not rec.tombstone
        assert rec.payload == dumps[key.decode()]
        assert rec.entry_id == f"1-{i}"
        assert rec.redis_version == source.redis_version
        assert before <= rec.read_at_us <= after
    assert len({r.read_at_us for r in recs}) == 1  # one TIME for the whole transaction
    assert recs[0].expire_at_ms == expected_expiry
    assert all(r.expire_at_ms is None for r in recs[1:])


@pytest.mark.anyio
async def test_source_gives_a_tombstone_for_an_absent_key(source: Source) -> None:
    [rec] = await source.read(0, [b"missing"], ["5-0"])
    assert isinstance(rec, KeyRecord)
    assert rec.tombstone and rec.type == "none" and rec.payload == b""
    assert rec.entry_id == "5-0" and rec.expire_at_ms is None and rec.read_at_us > 0


@pytest.mark.anyio
async def test_source_reads_binary_long_and_empty_values(
    redis_server: RedisServer, source: Source
) -> None:
    binary, long_key = b"\x00\xff\r\n\x80", b"k" * 10_000
    with redis_server.client() as c:
        c.set(binary, b"")
        c.set(long_key, b"\x00" * 3)
    a, b = await source.read(0, [binary, long_key], ["1-0", "1-1"])
    assert isinstance(a, KeyRecord) and isinstance(b, KeyRecord)
    assert a.key == binary and a.type == "string" and not a.tombstone
    assert b.key == long_key and b.type == "string"


@pytest.mark.anyio
async def test_source_reads_the_db_it_is_asked_for_not_the_urls(
    redis_server: RedisServer, source: Source
) -> None:
    with redis_server.client(0) as c0, redis_server.client(3) as c3:
        c0.set("k", "zero")
        c3.set("k", "three")
        dump3 = c3.dump("k")
    [rec] = await source.read(3, [b"k"], ["1-0"])
    assert isinstance(rec, KeyRecord)
    assert rec.db == 3 and rec.payload == dump3


@pytest.mark.anyio
async def test_source_refuses_a_db_the_server_does_not_have(source: Source) -> None:
    with pytest.raises(ResponseError):
        await source.read(99, [b"k"], ["1-0"])


@pytest.mark.anyio
async def test_source_read_refused_by_an_acl_raises_and_leaves_the_client_usable(
    redis_server: RedisServer,
) -> None:
    with redis_server.client() as c:
        c.set("open", "v")
        c.set("secret", "v")
        c.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["open*"], commands=["+@all"])
    s = Source(f"redis://reader:pw@127.0.0.1:{redis_server.port}/0")
    try:
        await s.check()
        with pytest.raises(ResponseError, match="no permissions"):
            await s.read(0, [b"open", b"secret"], ["1-0", "1-1"])
        [rec] = await s.read(0, [b"open"], ["1-2"])
        assert isinstance(rec, KeyRecord) and rec.type == "string"
    finally:
        await s.close()


@pytest.mark.anyio
async def test_source_read_survives_a_dropped_connection_and_cancelled_reads(
    redis_server: RedisServer, source: Source
) -> None:
    keys = [b"k%d" % i for i in range(2000)]
    with redis_server.client() as c:
        c.mset({k: k for k in keys})
    await source.read(0, keys[:1], ["1-0"])
    with redis_server.client() as c:
        c.client_kill_filter(_type="normal")  # our pooled connection is gone
    [rec] = await source.read(0, keys[:1], ["1-0"])
    assert isinstance(rec, KeyRecord)
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.005):
        with anyio.move_on_after(delay):
            await source.read(0, keys, ["1-0"] * len(keys))  # cut off wherever it is
    records = await source.read(0, keys, ["1-0"] * len(keys))
    with redis_server.client() as c:
        assert [r.payload for r in records if isinstance(r, KeyRecord)] == [c.dump(k) for k in keys]


@pytest.mark.anyio
async def test_source_pttl_fallback_is_within_a_millisecond(redis_server: RedisServer) -> None:
    s = Source(redis_server.url(), exact_expiry=False)
    await s.check()
    try:
        with redis_server.client() as c:
            c.set("t", "v", px=100_000)
            expected = int(c.execute_command("PEXPIRETIME", "t"))
        [rec] = await s.read(0, [b"t"], ["1-0"])
        assert isinstance(rec, KeyRecord) and rec.expire_at_ms is not None
        assert abs(rec.expire_at_ms - expected) <= 1
    finally:
        await s.close()


@pytest.mark.anyio
async def test_source_check_names_an_unreachable_source() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    s = Source(url)
    try:
        with pytest.raises(DependencyError, match="source Redis"):
            await s.check()
    finally:
        await s.close()


@pytest.mark.anyio
async def test_source_learns_the_redis_version(source: Source) -> None:
    assert source.redis_version.startswith("7.")
