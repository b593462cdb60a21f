"""Consumer groups: GroupReader's three ways of reading, entries in hand, and safe trimming."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from rrb_streams.wire.connections import connect
from rrb_streams.wire.entries import id_tuple
from rrb_streams.wire.group import GroupReader, ensure_group, safe_trim_id, trim
from tests.support.servers import RedisServer

STREAM = "rrb:test"
GROUP = "g"

pytestmark = pytest.mark.anyio


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url())
    await ensure_group(client, STREAM, GROUP)
    yield client
    await client.aclose()


async def add(r: Redis, n: int) -> list[str]:
    return [(await r.xadd(STREAM, {b"n": b"%d" % i})).decode() for i in range(n)]


async def test_ensure_group_is_idempotent_and_keeps_the_group_position(r: Redis) -> None:
    await add(r, 2)
    await GroupReader(r, STREAM, GROUP, "a").read(2, None)
    await ensure_group(r, STREAM, GROUP)
    (info,) = await r.xinfo_groups(STREAM)
    assert info["pending"] == 2  # not recreated from scratch


async def test_read_hands_out_new_entries_once_and_puts_them_in_hand(r: Redis) -> None:
    ids = await add(r, 3)
    reader = GroupReader(r, STREAM, GROUP, "a")
    got = await reader.read(10, None)
    assert [entry_id for entry_id, _ in got] == ids
    assert got[0][1] == {b"n": b"0"}
    assert reader.in_hand == set(ids)
    assert await reader.read(10, None) == []
    reader.done(ids[:2])
    assert reader.in_hand == {ids[2]}


async def test_read_blocks_until_an_entry_arrives(r: Redis) -> None:
    reader = GroupReader(r, STREAM, GROUP, "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(add, r, 1)
        with anyio.fail_after(5):
            got = await reader.read(1, 2000)
    assert len(got) == 1


async def test_sweep_hands_out_own_pending_entries_not_in_hand(r: Redis) -> None:
    ids = await add(r, 5)
    # An earlier run of the consumer "a" read everything and died.
    await GroupReader(r, STREAM, GROUP, "a").read(10, None)
    reader = GroupReader(r, STREAM, GROUP, "a")
    reader.in_hand.add(ids[1])  # already being worked on by this process
    pages = [page async for page in reader.sweep(2)]
    swept = [entry_id for page in pages for entry_id, _ in page]
    assert swept == [ids[0], *ids[2:]]
    assert all(len(page) <= 2 for page in pages)
    assert reader.in_hand == set(ids)
    # Another consumer's pending entries are not ours to sweep.
    assert [page async for page in GroupReader(r, STREAM, GROUP, "b").sweep(10)] == []


async def test_sweep_hands_out_nothing_acked_or_in_hand(r: Redis) -> None:
    ids = await add(r, 2)
    reader = GroupReader(r, STREAM, GROUP, "a")
    await reader.read(10, None)
    # Still pending on the server, but the caller acked it meanwhile: the snapshot of the
    # entries in hand, taken before the read, keeps the sweep from handing it out again.
    await r.xack(STREAM, GROUP, ids[0])
    assert [page async for page in reader.sweep(10)] == []


async def test_claim_takes_idle_entries_of_other_consumers_only(r: Redis) -> None:
    ids = await add(r, 4)
    await GroupReader(r, STREAM, GROUP, "dead").read(10, None)
    reader = GroupReader(r, STREAM, GROUP, "alive")
    start, fresh = await reader.claim(idle_s=60, count=10)
    assert (start, fresh) == ("0-0", [])  # not idle long enough
    await anyio.sleep(0.05)
    start, fresh = await reader.claim(idle_s=0.01, count=3)
    assert [entry_id for entry_id, _ in fresh] == ids[:3]
    assert start != "0-0"
    start, fresh = await reader.claim(idle_s=0.01, count=3, start=start)
    assert [entry_id for entry_id, _ in fresh] == ids[3:]
    assert reader.in_hand == set(ids)
    pending = await r.xpending_range(STREAM, GROUP, "-", "+", 10, consumername="alive")
    assert len(pending) == 4


async def test_claim_does_not_hand_out_entries_already_in_hand(r: Redis) -> None:
    await add(r, 2)
    reader = GroupReader(r, STREAM, GROUP, "a")
    await reader.read(10, None)
    await anyio.sleep(0.05)
    _, fresh = await reader.claim(idle_s=0.01, count=10)
    assert fresh == []


async def test_keep_alive_resets_the_idle_time_of_entries_in_hand(r: Redis) -> None:
    ids = await add(r, 1)
    reader = GroupReader(r, STREAM, GROUP, "a")
    await reader.read(10, None)
    await anyio.sleep(0.2)
    await reader.keep_alive(min_idle_s=0.01)
    (entry,) = await r.xpending_range(STREAM, GROUP, "-", "+", 1)
    assert entry["message_id"].decode() == ids[0]
    assert entry["time_since_delivered"] < 150
    # Not claimable by another consumer that waits longer than the fresh idle time.
    _, fresh = await GroupReader(r, STREAM, GROUP, "b").claim(idle_s=0.15, count=10)
    assert fresh == []


async def test_leave_deletes_the_consumer_only_when_nothing_is_pending(r: Redis) -> None:
    ids = await add(r, 1)
    reader = GroupReader(r, STREAM, GROUP, "a")
    await reader.read(10, None)
    assert not await reader.leave()
    assert [c["name"] for c in await r.xinfo_consumers(STREAM, GROUP)] == [b"a"]
    await r.xack(STREAM, GROUP, *ids)
    assert await reader.leave()
    assert await r.xinfo_consumers(STREAM, GROUP) == []


async def test_trim_keeps_every_entry_some_group_still_needs(r: Redis) -> None:
    ids = await add(r, 6)
    await ensure_group(r, STREAM, "other")
    a = GroupReader(r, STREAM, GROUP, "a")
    await a.read(4, None)
    await r.xack(STREAM, GROUP, *ids[:3])  # ids[3] still pending in GROUP
    b = GroupReader(r, STREAM, "other", "b")
    await b.read(2, None)
    await r.xack(STREAM, "other", *ids[:2])  # "other" was delivered two entries only
    # The lowest id "other" still needs comes right after the last one it was delivered.
    lowest = await safe_trim_id(r, STREAM)
    assert lowest is not None
    assert id_tuple(ids[1]) < id_tuple(lowest) <= id_tuple(ids[2])
    assert await trim(r, STREAM) == 2
    assert [e[0].decode() for e in await r.xrange(STREAM)] == ids[2:]


async def test_trim_of_a_missing_stream_or_a_stream_without_groups_drops_nothing(
    r: Redis,
) -> None:
    assert await safe_trim_id(r, "rrb:no-such-stream") is None
    await r.xadd("rrb:no-groups", {b"n": b"1"})
    assert await trim(r, "rrb:no-groups") == 0
    assert await r.xlen("rrb:no-groups") == 1
