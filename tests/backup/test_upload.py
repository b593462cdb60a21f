"""Uploaders against real redis-server processes, with change entries written directly."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis
from structlog.testing import capture_logs

from rrb_streams.backup.upload import Uploader
from rrb_streams.config import UploadConfig
from rrb_streams.errors import DependencyError
from rrb_streams.format import codec
from rrb_streams.format.layout import key_hash, latest_name, parse_name
from rrb_streams.storage.base import Storage
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire.entries import entry_fields
from tests.support.dataset import restore_latest, snapshot
from tests.support.faulty import FaultyStorage
from tests.support.pipeline import drained, running
from tests.support.servers import RedisServer, free_port
from tests.support.uploading import (
    DEAD,
    GROUP,
    OWN,
    STREAM,
    config,
    create_group,
    latest,
    note,
    pending,
)
from tests.support.wait import until


def populate_every_type(c: redis.Redis) -> list[bytes]:
    c.set("string:plain", "v")
    c.set("string:ttl", "v", px=600_000)
    c.hset("hash:plain", mapping={"f1": "1", "f2": b"\x00\xff"})
    c.hset("hash:ttl", mapping={"f": "v"})
    c.rpush("list:plain", *[str(i) for i in range(50)])
    c.rpush("list:ttl", "a")
    c.sadd("set:plain", "a", "b", "c")
    c.sadd("set:ttl", *[str(i) for i in range(300)])  # a hashtable, not a listpack
    c.zadd("zset:plain", {"a": 1.5, "b": -2.0, "c": 1e10})
    c.zadd("zset:ttl", {"x": 0.25})
    c.xadd("stream:plain", {"f": "v"})
    c.xadd("stream:ttl", {"f": "w"})
    c.set(b"bin:\x00\xff\r\n\x80", b"\x01\x02")
    c.set(b"long:" + b"k" * 10_000, "long key")
    c.set("string:empty", b"")
    expire_at = int(time.time() * 1000) + 3_600_123
    for kind in ("hash", "list", "set", "zset", "stream"):
        c.pexpireat(f"{kind}:ttl", expire_at)
    return list(c.scan_iter(count=1000))


@pytest.mark.anyio
async def test_upload_round_trips_every_core_type_with_and_without_ttl(
    redis_factory: Callable[..., RedisServer],
) -> None:
    source, target = redis_factory(), redis_factory()
    storage = MemoryStorage()
    with source.client() as c:
        keys = populate_every_type(c)
        note(c, *keys)
        u = Uploader(config(source), storage)
        async with running(u):
            await until(lambda: drained(c))
        assert len(storage.objects) == len(keys) == u.puts
        for key in keys:
            rec = latest(storage, key)
            assert rec is not None and rec.key == key and not rec.tombstone
            assert rec.type == c.type(key).decode()
            assert rec.redis_version.startswith("7.")
        with target.client() as t:
            assert await restore_latest(storage, t) == len(keys)
            assert snapshot(t) == snapshot(c)
            assert t.get("string:empty") == b""


@pytest.mark.anyio
async def test_upload_deletes_the_latest_object_when_the_key_is_gone(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        c.set("short-lived", "v")
        note(c, "k", "short-lived")
        async with running(u):
            await until(lambda: drained(c))
            assert latest(storage, b"k") is not None
            c.delete("k")
            note(c, "k", ev="del")
            c.pexpire("short-lived", 1)
            await anyio.sleep(0.01)
            note(c, "short-lived", ev="expired")
            await until(lambda: drained(c))
    assert storage.objects == {}
    assert u.deletes == 2


@pytest.mark.anyio
async def test_upload_versioning_keeps_one_version_per_change_and_a_tombstone(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server, versioning=True), storage)
    dumps = []
    with redis_server.client() as c:
        async with running(u):
            for value in ("v1", "v2"):
                c.set("k", value)
                dumps.append(c.dump("k"))
                note(c, "k")
                await until(lambda: drained(c))
            c.delete("k")
            note(c, "k", ev="del")
            await until(lambda: drained(c))
    names = list(storage.objects)
    assert len(names) == 3 and names == sorted(names)
    parsed = [parse_name(n) for n in names]
    records = [codec.decode(storage.objects[n]) for n in names]
    assert all(p is not None and p.versioned for p in parsed)
    assert [p.read_at_us for p in parsed if p] == [r.read_at_us for r in records]
    assert records[0].read_at_us < records[1].read_at_us < records[2].read_at_us
    assert [r.payload for r in records[:2]] == dumps
    assert [r.tombstone for r in records] == [False, False, True]
    assert names[2].endswith(".tombstone")


# With segments the three keys share one object; with keys, one object each.
LAYOUTS = pytest.mark.parametrize(("layout", "objects"), [("keys", 3), ("segments", 1)])


@pytest.mark.anyio
@LAYOUTS
async def test_upload_acks_only_after_the_put_returned(
    redis_server: RedisServer, layout: str, objects: int
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.hang("put")
    u = Uploader(config(redis_server, concurrency=1, layout=layout), storage)
    with redis_server.client() as c:
        for k in ("a", "b", "c"):
            c.set(k, k)
        note(c, "a", "b", "c")
        async with running(u):
            await storage.wait_hanging("put")
            await anyio.sleep(0.3)
            assert pending(c) == 3
            assert u.entries_acked == 0 and inner.objects == {}
            storage.release("put")
            await until(lambda: drained(c))
    assert len(inner.objects) == objects and u.entries_acked == 3


@pytest.mark.anyio
async def test_upload_storage_outage_acks_nothing_early_and_recovers_once(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.down = True
    keys = [f"k{i}" for i in range(10)]
    with capture_logs() as logs, redis_server.client() as c:
        u = Uploader(config(redis_server), storage)
        for k in keys:
            c.set(k, k)
        note(c, *keys)
        async with running(u):
            await until(lambda: storage.failures["put"] >= 3 * len(keys))  # three rounds
            assert pending(c) == len(keys)
            assert u.entries_acked == 0 and inner.objects == {}
            storage.down = False
            await until(lambda: drained(c))
    assert len(inner.objects) == len(keys)
    events = [e["event"] for e in logs]
    assert events.count("upload.recovered") == 1
    retries = [e for e in logs if e["event"] == "upload.retry"]
    assert len(retries) >= 3
    assert [e["consecutive_errors"] for e in retries] == list(range(1, len(retries) + 1))
    assert "StorageUnavailable" in retries[0]["error"]


@pytest.mark.anyio
async def test_upload_transient_put_failures_are_retried_until_they_pass(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.fail_next(4, "put")
    storage.fail_next(2, "flush")
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with running(u):
            await until(lambda: drained(c))
    assert latest(inner, b"k") is not None and u.dead_lettered == 0


@pytest.mark.anyio
async def test_upload_dead_letters_a_poison_entry_and_processes_the_others(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    poison = latest_name("", 0, b"poison")
    storage.reject = lambda name: name == poison
    u = Uploader(config(redis_server, max_attempts=3), storage)
    with capture_logs() as logs, redis_server.client() as c:
        for k in ("good1", "poison", "good2"):
            c.set(k, k)
        [_, poison_id, _] = note(c, "good1", "poison", "good2")
        junk_id = c.xadd(STREAM, {"junk": "1"}).decode()
        async with running(u):
            await until(lambda: drained(c))
        letters = {fields[b"entry"].decode(): fields for _, fields in c.xrange(DEAD)}
    assert set(letters) == {poison_id, junk_id}
    assert letters[poison_id][b"key"] == b"poison"
    assert letters[poison_id][b"attempts"] == b"3"
    assert letters[poison_id][b"consumer"] == b"u1"
    assert b"rejected" in letters[poison_id][b"reason"]
    assert b"malformed" in letters[junk_id][b"reason"] and letters[junk_id][b"junk"] == b"1"
    assert storage.failures["put"] == 3
    assert set(inner.objects) == {latest_name("", 0, b"good1"), latest_name("", 0, b"good2")}
    assert u.dead_lettered == 2 and u.entries_acked == 4
    dead = [e for e in logs if e["event"] == "upload.dead_lettered"]
    assert {(e["entry"], e["key"]) for e in dead} == {(poison_id, "poison"), (junk_id, "")}


@pytest.mark.anyio
async def test_upload_claims_the_entries_of_a_dead_consumer(redis_server: RedisServer) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        create_group(c)
        for k in ("a", "b", "c"):
            c.set(k, k)
        note(c, "a", "b", "c")
        assert len(c.xreadgroup(GROUP, "dead", {STREAM: ">"})[0][1]) == 3  # never acked
        u = Uploader(config(redis_server, claim_idle=0.3), storage)
        with capture_logs() as logs:
            async with running(u):
                await until(lambda: drained(c), within=5)
        consumers = {x["name"]: x["pending"] for x in c.xinfo_consumers(STREAM, GROUP)}
    assert u.claimed == 3 and len(storage.objects) == 3
    assert consumers == {b"dead": 0}
    assert [e["entries"] for e in logs if e["event"] == "upload.claimed"] == [3]


@pytest.mark.anyio
async def test_upload_restarted_under_its_name_redoes_its_own_pending_at_once(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        create_group(c)
        c.set("a", "1")
        note(c, "a", "a")
        c.xreadgroup(GROUP, "u1", {STREAM: ">"})  # read by "u1", which then died
        u = Uploader(config(redis_server, consumer="u1", claim_idle=60), storage)
        async with running(u):
            await until(lambda: drained(c), within=3)
    assert latest(storage, b"a") is not None and u.claimed == 0 and u.puts == 1


@pytest.mark.anyio
async def test_upload_merges_repeated_entries_for_one_key(redis_server: RedisServer) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, *["k"] * 100)
        async with running(u):
            await until(lambda: drained(c))
    assert u.puts == 1 and u.coalesced == 99 and u.entries_acked == 100


@pytest.mark.anyio
async def test_upload_acks_entries_for_its_own_keys_without_backing_them_up(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("rrb:something", "x")
        c.set("real", "y")
        note(c, "rrb:something", "real")
        async with running(u):
            await until(lambda: drained(c))
    assert list(storage.objects) == [latest_name("", 0, b"real")]
    assert u.entries_acked == 2


@pytest.mark.anyio
async def test_upload_reads_each_entry_from_its_own_db(redis_server: RedisServer) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server), storage)
    with redis_server.client(0) as c0, redis_server.client(2) as c2:
        c0.set("k", "zero")
        c2.set("k", "two")
        note(c0, "k", db=0)
        note(c0, "k", db=2)
        async with running(u):
            await until(lambda: drained(c0))
        dumps = {0: c0.dump("k"), 2: c2.dump("k")}
    for db in (0, 2):
        rec = latest(storage, b"k", db)
        assert rec is not None and rec.db == db and rec.payload == dumps[db]


@pytest.mark.anyio
async def test_upload_holds_at_most_concurrency_plus_one_batches(
    redis_server: RedisServer,
) -> None:
    storage = FaultyStorage(MemoryStorage())
    storage.hang("put")
    u = Uploader(config(redis_server, concurrency=1, batch_size=5), storage)
    with redis_server.client() as c:
        keys = [f"k{i}" for i in range(50)]
        for k in keys:
            c.set(k, k)
        note(c, *keys)
        async with running(u):
            await storage.wait_hanging("put")
            await anyio.sleep(0.5)
            assert pending(c) == 10  # one batch in the worker, one waiting to be handed over
            storage.release("put")
            await until(lambda: drained(c))


@pytest.mark.anyio
async def test_upload_hot_key_with_four_uploaders_ends_on_the_final_value(
    redis_server: RedisServer,
) -> None:
    changes, chunk = 5000, 25
    storage = MemoryStorage()
    uploaders = [
        Uploader(config(redis_server, consumer=f"u{i}", linger=0.1), storage) for i in range(4)
    ]
    r = Redis.from_url(redis_server.url())
    try:
        async with running(*uploaders, within=60):
            started = anyio.current_time()
            for _ in range(changes // chunk):
                pipe = r.pipeline(transaction=False)
                for _ in range(chunk):
                    pipe.incr("hot")
                    pipe.xadd(STREAM, entry_fields(0, b"hot", "incrby", 0))  # type: ignore[arg-type]
                await pipe.execute()
                await anyio.sleep(0.01)
            elapsed = anyio.current_time() - started
            with redis_server.client() as c:
                await until(lambda: drained(c), within=20)
        with redis_server.client() as c:
            rec = latest(storage, b"hot")
            assert rec is not None
            c.restore("check", 0, rec.payload, replace=True)
            assert c.get("check") == c.get("hot") == str(changes).encode()
    finally:
        await r.aclose()
    puts = sum(u.puts for u in uploaders)
    assert puts == storage.puts
    assert sum(u.entries_acked for u in uploaders) == changes
    rate = changes / elapsed
    print(f"hot key: {changes} changes at {rate:.0f}/s -> {puts} PUTs ({puts / changes:.4f})")
    assert puts <= changes / 10


@pytest.mark.anyio
async def test_upload_last_write_wins_over_a_slow_stale_writer(redis_server: RedisServer) -> None:
    inner = MemoryStorage()
    slow_storage = FaultyStorage(inner)
    slow_storage.hang("put")
    slow = Uploader(config(redis_server, consumer="slow", lease=0.5, concurrency=1), slow_storage)
    fast = Uploader(config(redis_server, consumer="fast", lease=0.5), inner)
    with redis_server.client() as c:
        c.set("k", "v1")
        stale = c.dump("k")
        note(c, "k")
        async with running(slow):
            await slow_storage.wait_hanging("put")  # slow read v1 and is writing it
            c.set("k", "v2")
            fresh = c.dump("k")
            # Hand the next entry to "fast" atomically, before slow's blocked read can take it.
            pipe = c.pipeline(transaction=True)
            pipe.xadd(STREAM, entry_fields(0, b"k", "set", 0))  # type: ignore[arg-type]
            pipe.xreadgroup(GROUP, "fast", {STREAM: ">"})
            pipe.execute()
            async with running(fast):
                # fast waits out slow's lease, then writes v2.
                await until(lambda: getattr(latest(inner, b"k"), "payload", None) == fresh)
                slow_storage.release("put")  # the stale v1 lands after v2...
                await until(lambda: drained(c))
    rec = latest(inner, b"k")
    assert rec is not None and rec.payload == fresh != stale  # ...and was overwritten again
    assert inner.puts == 3  # fast's v2, slow's stale v1, slow's redo with v2
    assert slow.stats.redone == 1


class _SlowPuts(MemoryStorage):
    """Every put takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def put(self, name: str, data: bytes) -> None:
        await anyio.sleep(self.delay)
        await super().put(name, data)


@pytest.mark.anyio
async def test_upload_round_longer_than_a_lease_keeps_its_leases(
    redis_server: RedisServer,
) -> None:
    # 40 keys, one writer, 50 ms a put: a 2 s round, ten times the lease. Without renewal
    # every lease runs out before the release and the round redoes every key, forever.
    storage = _SlowPuts(0.05)
    u = Uploader(config(redis_server, lease=0.2, concurrency=1), storage)
    with redis_server.client() as c:
        keys = [f"k{i}" for i in range(40)]
        for k in keys:
            c.set(k, k)
        note(c, *keys)
        async with running(u):
            await until(lambda: drained(c), within=20)
    assert u.stats.redone == 0
    assert storage.puts == 40
    for k in keys:
        rec = latest(storage, k.encode())
        assert rec is not None and rec.key == k.encode()


@pytest.mark.anyio
async def test_upload_trims_acked_entries_but_never_pending_ones(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server, trim_interval=0.1), storage)
    with capture_logs() as logs, redis_server.client() as c:
        c.set("k", "v")
        note(c, *["k"] * 20)
        async with running(u):
            await until(lambda: drained(c))
            await until(lambda: c.xlen(STREAM) == 0, within=3)
            # Entries a dead consumer holds, followed by entries the uploader acks.
            pipe = c.pipeline(transaction=True)
            for _ in range(3):
                pipe.xadd(STREAM, entry_fields(0, b"k", "set", 0))  # type: ignore[arg-type]
            pipe.xreadgroup(GROUP, "dead", {STREAM: ">"})
            held = [entry_id for entry_id in pipe.execute()[:3]]
            note(c, *["k"] * 10)
            await until(lambda: pending(c) == 3 and c.xlen(STREAM) == 13, within=3)
            await anyio.sleep(0.3)  # more trims: still nothing from the held entries on
            assert c.xlen(STREAM) == 13
            assert [e[0] for e in c.xrange(STREAM, count=3)] == held
    assert any(e["event"] == "upload.trimmed" and e["entries"] >= 20 for e in logs)


@pytest.mark.anyio
@LAYOUTS
async def test_upload_stop_finishes_in_flight_work_and_removes_the_idle_consumer(
    redis_server: RedisServer, layout: str, objects: int
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.hang("put")
    u = Uploader(config(redis_server, layout=layout), storage)
    returned = anyio.Event()

    async def run() -> None:
        await u.run()
        returned.set()

    with redis_server.client() as c:
        for k in ("a", "b", "c"):
            c.set(k, k)
        note(c, "a", "b", "c")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await storage.wait_hanging("put")
                u.stop()
                await anyio.sleep(0.3)
                assert not returned.is_set()  # still finishing its batch
                storage.release("put")
                await returned.wait()
        assert pending(c) == 0 and u.entries_acked == 3 and len(inner.objects) == objects
        assert c.xinfo_consumers(STREAM, GROUP) == []


@pytest.mark.anyio
async def test_upload_stop_of_an_idle_uploader_is_prompt(redis_server: RedisServer) -> None:
    u = Uploader(config(redis_server), MemoryStorage())
    async with anyio.create_task_group() as tg:
        await tg.start(u.run)
        await anyio.sleep(0.2)  # blocked in XREADGROUP
        started = anyio.current_time()
        u.stop()
    assert anyio.current_time() - started < 0.5


@pytest.mark.anyio
async def test_upload_cancelled_with_pending_work_keeps_its_consumer(
    redis_server: RedisServer,
) -> None:
    storage = FaultyStorage(MemoryStorage())
    storage.down = True
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with anyio.create_task_group() as tg:
            await tg.start(u.run)
            await until(lambda: storage.failures["put"] > 0)
            tg.cancel_scope.cancel()  # the grace period ran out
        consumers = {x["name"]: x["pending"] for x in c.xinfo_consumers(STREAM, GROUP)}
        assert consumers == {b"u1": 1}
        # The lease was let go on the way out: a successor need not wait it out.
        assert not c.keys("rrb:lease:*")


@pytest.mark.anyio
async def test_upload_fails_fast_when_a_redis_is_unreachable(redis_server: RedisServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for cfg in (
        UploadConfig(source_url=dead, stream_url=redis_server.url()).validate(),
        UploadConfig(source_url=redis_server.url(), stream_url=dead).validate(),
    ):
        storage: Storage = MemoryStorage()
        with pytest.raises(DependencyError, match=re.escape("127.0.0.1")):
            await Uploader(cfg, storage).run()


@pytest.mark.anyio
async def test_upload_keeps_its_entries_from_live_consumers_while_retrying(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    broken = FaultyStorage(inner)
    broken.down = True
    first = Uploader(config(redis_server, consumer="first", claim_idle=0.5), broken)
    second = Uploader(config(redis_server, consumer="second", claim_idle=0.5), inner)
    with redis_server.client() as c:
        for k in ("a", "b", "c"):
            c.set(k, k)
        note(c, "a", "b", "c")
        async with running(first):
            await until(lambda: broken.failures["put"] > 0)
            async with running(second):
                await anyio.sleep(1.5)  # three times claim_idle
                assert second.claimed == 0
                assert {x["name"]: x["pending"] for x in c.xinfo_consumers(STREAM, GROUP)} == {
                    b"first": 3,
                    b"second": 0,
                }
                broken.down = False
                await until(lambda: drained(c))
    assert first.puts == 3 and len(inner.objects) == 3


@pytest.mark.anyio
async def test_upload_source_outage_retries_and_recovers(
    redis_factory: Callable[..., RedisServer],
) -> None:
    source, stream = redis_factory(), redis_factory()
    storage = MemoryStorage()
    u = Uploader(config(source, stream_url=stream.url()), storage)
    with capture_logs() as logs, stream.client() as s:
        async with running(u):
            source.stop()
            note(s, "k")
            await until(lambda: any(e["event"] == "upload.retry" for e in logs))
            assert pending(s) == 1 and u.entries_acked == 0
            source.start()
            with source.client() as c:
                c.set("k", "back")
            await until(lambda: drained(s))
    assert latest(storage, b"k") is not None
    assert [e["stage"] for e in logs if e["event"] == "upload.recovered"] == ["batch"]


@pytest.mark.anyio
async def test_upload_acks_entries_a_done_marker_covers_without_a_put(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        [entry] = note(c, "k")
        c.set(OWN.done(0, key_hash(b"k")), entry)  # another uploader stored a later read
        async with running(u):
            await until(lambda: drained(c))
    assert u.puts == 0 and u.coalesced == 1 and u.entries_acked == 1 and storage.objects == {}


@pytest.mark.anyio
async def test_upload_rewrites_claimed_entries_whatever_the_done_marker_says(
    redis_server: RedisServer,
) -> None:
    # The dead consumer may have died between a stale write landing and its redo.
    storage = MemoryStorage()
    u = Uploader(config(redis_server, claim_idle=0.3), storage)
    with redis_server.client() as c:
        create_group(c)
        c.set("k", "v")
        [entry] = note(c, "k")
        c.xreadgroup(GROUP, "dead", {STREAM: ">"})
        c.set(OWN.done(0, key_hash(b"k")), entry)
        async with running(u):
            await until(lambda: drained(c), within=5)
    assert u.claimed == 1 and u.puts == 1 and latest(storage, b"k") is not None


@pytest.mark.anyio
async def test_upload_storage_call_that_hangs_is_given_up_and_retried(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.hang("put")
    u = Uploader(config(redis_server, lease=0.1), storage)  # calls give up after 4 leases
    with capture_logs() as logs, redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with running(u):
            await until(lambda: any(e["event"] == "upload.retry" for e in logs))
            assert pending(c) == 1 and inner.objects == {}
            storage.release("put")
            await until(lambda: drained(c))
    retry = next(e for e in logs if e["event"] == "upload.retry")
    assert "StorageUnavailable" in retry["error"] and "took over 0.4 s" in retry["error"]
    assert latest(inner, b"k") is not None


@pytest.mark.anyio
async def test_upload_a_failed_top_up_read_keeps_the_entries_already_read(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails while a short batch lingers (the stream's Redis restarting) must not
    drop the entries read before it: they are in hand, so no other consumer would take them."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from rrb_streams.backup import upload
    from rrb_streams.wire.group import GroupReader

    class FailingTopUp(GroupReader):
        failed = False

        async def read(self, count: int, block_ms: int | None) -> list[tuple[str, Any]]:
            if block_ms is None and not FailingTopUp.failed:  # the linger's top-up read
                FailingTopUp.failed = True
                raise RedisConnectionError("the stream's Redis restarted")
            return await super().read(count, block_ms)

    monkeypatch.setattr(upload, "GroupReader", FailingTopUp)
    storage = MemoryStorage()
    u = Uploader(config(redis_server, linger=0.2, batch_size=50), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        async with running(u):
            note(c, "k")
            await until(lambda: FailingTopUp.failed and drained(c), within=10)
    assert FailingTopUp.failed and latest(storage, b"k") is not None
