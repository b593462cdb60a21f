"""Per-key leases and done markers against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from rrb_streams.backup.lease import CHUNK, Grant, Leases, Release
from rrb_streams.wire.index import Stored
from rrb_streams.wire.keys import OwnKeys
from tests.support.servers import RedisServer

OWN = OwnKeys()
KEY = (0, "ab" * 32)


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url())
    yield client
    await client.aclose()


def leases(r: Redis, lease_s: float = 5.0) -> Leases:
    return Leases(r, OWN, OWN.stream, lease_s=lease_s)


@pytest.mark.anyio
async def test_lease_is_exclusive_until_released(r: Redis) -> None:
    a, b = leases(r), leases(r)
    grants, _ = await a.acquire([KEY], "token-a")
    assert [(g.held, g.done) for g in grants] == [(True, None)]
    grants, _ = await b.acquire([KEY], "token-b")
    assert grants == [Grant(False, None)]
    assert await a.release("token-a", [Release(*KEY)]) == [True]
    grants, _ = await b.acquire([KEY], "token-b")
    assert grants[0].held


@pytest.mark.anyio
async def test_lease_release_with_a_lost_token_changes_nothing(r: Redis) -> None:
    a = leases(r, lease_s=0.05)
    await a.acquire([KEY], "old")
    await anyio.sleep(0.1)  # expired
    b = leases(r)
    assert (await b.acquire([KEY], "new"))[0][0].held
    # The first holder's release must neither free the new holder's lease nor move the marker.
    assert await a.release("old", [Release(*KEY, done="9999-0")]) == [False]
    assert await r.get(OWN.lease(*KEY)) == b"new"
    assert await r.get(OWN.done(*KEY)) is None


@pytest.mark.anyio
async def test_lease_renew_extends_only_leases_still_ours(r: Redis) -> None:
    a = leases(r, lease_s=0.3)
    other = (0, "cd" * 32)
    await a.acquire([KEY, other], "mine")
    await r.set(OWN.lease(*other), "theirs")  # lost to another holder
    keys = [KEY, other, (0, "ef" * 32)]  # the last was never taken
    for _ in range(4):  # 0.6 s in all: twice the lease
        await anyio.sleep(0.15)
        assert await a.renew("mine", keys) == [True, False, False]
    assert await r.get(OWN.lease(*KEY)) == b"mine"
    assert 0 < await r.pttl(OWN.lease(*KEY)) <= 300
    assert await r.get(OWN.lease(*other)) == b"theirs"
    assert await r.pttl(OWN.lease(*other)) == -1  # untouched: no expiry of ours put on it
    assert await r.exists(OWN.lease(0, "ef" * 32)) == 0
    assert await a.renew("mine", [(0, f"{i:064x}") for i in range(CHUNK + 1)]) == [False] * (
        CHUNK + 1
    )


@pytest.mark.anyio
async def test_lease_done_marker_only_moves_forward(r: Redis) -> None:
    a = leases(r)
    steps = [
        ("10-5", "10-5"),
        ("9-7", "10-5"),  # older ms, bigger seq: stays
        ("10-10", "10-10"),  # same ms, seq compared as a number, not as text
        ("10-9", "10-10"),
        ("100-0", "100-0"),  # more digits: newer, though "100" < "99" as text
        ("99-99", "100-0"),
    ]
    for proposed, expected in steps:
        grants, _ = await a.acquire([KEY], "t")
        assert grants[0].held
        assert await a.release("t", [Release(*KEY, done=proposed)]) == [True]
        assert await r.get(OWN.done(*KEY)) == expected.encode()
    ttl = await r.pttl(OWN.done(*KEY))
    assert 0 < ttl <= 10 * 60 * 1000


@pytest.mark.anyio
async def test_lease_grant_reports_the_marker_and_the_stream_tail(r: Redis) -> None:
    a = leases(r)
    grants, tail = await a.acquire([KEY], "t")
    assert tail is None  # no stream yet
    await a.release("t", [Release(*KEY, done="50-3")])
    last = (await r.xadd(OWN.stream, {"x": "1"})).decode()
    grants, tail = await a.acquire([KEY, (1, KEY[1])], "t2")
    assert tail == last
    assert (grants[0].held, grants[0].done) == (True, "50-3")
    assert grants[0].covers("50-3") and grants[0].covers("49-9")
    assert not grants[0].covers("50-4")
    assert (grants[1].held, grants[1].done) == (True, None)  # another db: its own lease and marker
    assert not grants[1].covers("1-0")


@pytest.mark.anyio
async def test_lease_expires_so_a_dead_holder_cannot_block_a_key(r: Redis) -> None:
    a, b = leases(r, lease_s=0.1), leases(r)
    assert (await a.acquire([KEY], "dead"))[0][0].held
    assert not (await b.acquire([KEY], "live"))[0][0].held
    await anyio.sleep(0.15)
    assert (await b.acquire([KEY], "live"))[0][0].held


@pytest.mark.anyio
async def test_lease_release_survives_a_script_cache_flush(r: Redis) -> None:
    a = leases(r)
    await a.acquire([KEY], "t")
    await r.script_flush()
    assert await a.release("t", [Release(*KEY, done="1-1")]) == [True]
    assert await r.get(OWN.done(*KEY)) == b"1-1"


@pytest.mark.anyio
async def test_lease_taken_again_with_the_same_token_is_still_held(r: Redis) -> None:
    # A pipeline retried after a dropped connection sends SET NX a second time.
    a = leases(r)
    assert (await a.acquire([KEY], "t"))[0][0].held
    assert (await a.acquire([KEY], "t"))[0][0].held
    assert not (await a.acquire([KEY], "other"))[0][0].held


@pytest.mark.anyio
async def test_lease_reads_and_updates_the_index_only_while_held(r: Redis) -> None:
    a, b = leases(r), leases(r)
    index = OWN.index(0)
    await r.hset(index, b"k\x00ey", b"old-digest")
    grants, _ = await a.acquire([KEY], "a", index_fields=[b"k\x00ey"])
    assert [(g.held, g.done, g.stored) for g in grants] == [(True, None, b"old-digest")]
    grants, _ = await b.acquire([KEY], "b", index_fields=[b"k\x00ey"])
    assert grants == [Grant(False, None)]  # not held: nothing to trust
    assert await a.release("a", [Release(*KEY, "1-0", Stored(b"k\x00ey", b"\x00new"))]) == [True]
    assert await r.hget(index, b"k\x00ey") == b"\x00new"
    await b.acquire([KEY], "b")
    assert await b.release("b", [Release(*KEY, "2-0", Stored(b"k\x00ey", None))]) == [True]
    assert await r.exists(index) == 0


@pytest.mark.anyio
async def test_lease_lost_leaves_the_index_alone(r: Redis) -> None:
    a = leases(r, lease_s=0.05)
    await r.hset(OWN.index(0), "k", "-")
    await a.acquire([KEY], "old", index_fields=[b"k"])
    await anyio.sleep(0.1)
    assert await a.release("old", [Release(*KEY, "1-0", Stored(b"k", b"digest"))]) == [False]
    assert await a.release("old", [Release(*KEY, "1-0", Stored(b"k", None))]) == [False]
    assert await r.hget(OWN.index(0), "k") == b"-"


async def script_calls(r: Redis) -> int:
    stats = await r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


@pytest.mark.anyio
async def test_lease_a_round_of_many_keys_takes_one_script_call_per_chunk(r: Redis) -> None:
    keys = [(i % 3, f"{i:064x}") for i in range(CHUNK * 2 + 7)]
    fields = [b"key:%d" % i for i in range(len(keys))]
    a, b = leases(r), leases(r)
    await r.hset(OWN.index(1), fields[1], b"digest-1")
    last = (await r.xadd(OWN.stream, {"x": "1"})).decode()
    await a.acquire([KEY], "warm-up")  # loads the scripts: a first call is NOSCRIPT
    await a.release("warm-up", [Release(*KEY)])
    before = await script_calls(r)
    grants, tail = await a.acquire(keys, "a", index_fields=fields)
    assert await script_calls(r) - before == 3
    assert tail == last and all(g.held for g in grants)
    assert grants[1].stored == b"digest-1" and grants[0].stored is None
    grants, _ = await b.acquire(keys, "b", index_fields=fields)
    assert not any(g.held for g in grants)
    releases = [
        Release(db, h, "7-1", Stored(f, b"d")) for (db, h), f in zip(keys, fields, strict=True)
    ]
    before = await script_calls(r)
    assert await a.release("a", releases) == [True] * len(keys)
    assert await script_calls(r) - before == 3
    assert await r.get(OWN.done(*keys[-1])) == b"7-1"
    assert await r.hget(OWN.index(keys[-1][0]), fields[-1]) == b"d"
    assert not await r.keys("rrb:lease:*")


@pytest.mark.anyio
async def test_every_acquire_draws_a_higher_stamp_than_any_before(r: Redis) -> None:
    a, b = leases(r), leases(r)
    (first,), _ = await a.acquire([KEY], "token-a")
    (refused,), _ = await b.acquire([KEY], "token-b")
    assert await a.release("token-a", [Release(*KEY)]) == [True]
    (second,), _ = await b.acquire([KEY], "token-b")
    assert refused.stamp == 0  # not held: no stamp to read under
    assert second.stamp > first.stamp > 0
    # Microseconds of the stream Redis's clock: close to the time now.
    assert abs(first.stamp - time.time() * 1_000_000) < 60_000_000


@pytest.mark.anyio
async def test_stamps_stay_above_a_clock_value_far_in_the_future(r: Redis) -> None:
    # A stream Redis whose clock stepped back (or a clock value set by a previous server)
    # must not make stamps go down: the stored value plus one wins over TIME.
    future = int(time.time() * 1_000_000) + 3_600_000_000
    await r.set(OWN.stamp, future)
    (grant,), _ = await leases(r).acquire([KEY], "token-a")
    assert grant.stamp == future + 1


@pytest.mark.anyio
async def test_stamps_start_from_the_clock_when_the_stream_redis_lost_them(r: Redis) -> None:
    (before,), _ = await leases(r).acquire([KEY], "token-a")
    await r.delete(OWN.stamp)  # a stream Redis restarted empty
    (after,), _ = await leases(r).acquire([(1, "other")], "token-b")
    assert after.stamp > before.stamp
