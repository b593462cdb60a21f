"""A restore run's state in a real Redis: the planner's lock guards every planning step,
acknowledgements count once, and a finished run leaves nothing behind."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from rrb_streams.config import RestoreConfig
from rrb_streams.format.selection import Item
from rrb_streams.restore.state import (
    GROUP,
    Ack,
    PlannerLockLost,
    RunKeys,
    RunState,
    run_id,
    target_identity,
)
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.cluster import slot_of
from tests.support.servers import RedisServer

pytestmark = pytest.mark.anyio


def items(n: int, start: int = 0) -> list[Item]:
    return [
        Item(f"db0/{i:02x}/{i:064x}", (f"db0/{i:02x}/{i:064x}.backup",), 10)
        for i in range(start, start + n)
    ]


async def test_a_planner_that_lost_its_lock_adds_nothing(redis_server: RedisServer) -> None:
    r = Redis.from_url(redis_server.url())
    keys = RunKeys("rrb:", "run1")
    first, second = RunState(r, keys, "first"), RunState(r, keys, "second")
    await first.join("test")
    assert await first.take_planner(10)
    assert not await second.take_planner(10), "two planners at once"
    await first.add(items(3), per_entry=2, cursor="a", done=False)
    assert await r.xlen(keys.stream) == 2  # 3 items, 2 to an entry

    await r.delete(keys.planner)  # the lock ran out while the first planner stalled
    assert await second.take_planner(10)
    with pytest.raises(PlannerLockLost):
        await first.add(items(3, 3), per_entry=2, cursor="b", done=True)
    with pytest.raises(PlannerLockLost):
        await first.offer([("ab" * 32, 5, 1, "x")], cursor="c", listed=1, foreign=0)
    assert await r.xlen(keys.stream) == 2
    totals = await first.totals()
    assert totals["planned"] == 3 and not totals.plan_done
    assert await first.cursor() == ("a", "group")
    assert not await first.renew_planner(10)
    await first.release_planner()  # not its lock any more: must not free it
    assert await r.get(keys.planner) == b"second"
    await r.aclose()


async def test_an_entry_acknowledged_twice_counts_once(redis_server: RedisServer) -> None:
    r = Redis.from_url(redis_server.url())
    keys = RunKeys("rrb:", "run2")
    state = RunState(r, keys, "me")
    await state.join("test")
    assert await state.take_planner(10)
    await state.add(items(2), per_entry=2, cursor="z", done=True)
    reply = await r.xreadgroup(GROUP, "w1", {keys.stream: ">"}, count=1)
    entry_id = reply[0][1][0][0].decode()
    ack = Ack(entry_id, {"restored": 1, "failed": 1, "done": 2, "bytes": 7}, [("obj", "bad")])
    assert await state.ack([ack]) == 1
    assert await state.ack([ack]) == 0, "a second writer's ack of a claimed entry"
    assert await state.finished()
    totals = await state.finish()
    assert totals is not None
    assert (totals["restored"], totals["failed"], totals["done"], totals["bytes"]) == (1, 1, 2, 7)
    assert totals.failures == [("obj", "bad")]
    assert await state.finish() is None, "a second finisher"
    assert await r.keys("rrb:*") == []
    await r.aclose()


def test_run_identity_ignores_credentials_and_follows_what_is_restored() -> None:
    spec = StorageSpec(kind="s3", bucket="b", base="p/")
    base = RestoreConfig(target_url="redis://h:6379/0", storage=spec).validate()
    same = RestoreConfig(target_url="rediss://u:secret@H:6379", storage=spec).validate()
    assert run_id(base) == run_id(same)
    assert target_identity("redis://h/0") == "h:6379/0"
    for other in (
        RestoreConfig(target_url="redis://h:6380/0", storage=spec),
        RestoreConfig(target_url="redis://h:6379/0", storage=spec, match="a*"),
        RestoreConfig(target_url="redis://h:6379/0", storage=spec, at_us=5),
        RestoreConfig(target_url="redis://h:6379/0", storage=spec, path_prefix="x"),
        RestoreConfig(target_url="redis://h:6379/0", storage=spec, format="legacy"),
        RestoreConfig(target_url="redis://h:6379/0", storage=StorageSpec(kind="s3", bucket="c")),
    ):
        assert run_id(other.validate()) != run_id(base)


def test_a_runs_keys_in_a_cluster_share_one_slot_under_the_prefix() -> None:
    plain, tagged = RunKeys("mine:", "r1"), RunKeys("mine:", "r1", cluster=True)
    assert plain.stream == "mine:restore:r1"
    assert tagged.stream == "mine:{mine:}restore:r1"
    assert all(k.startswith("mine:") for k in tagged.all())
    assert {slot_of(k.encode()) for k in tagged.all()} == {slot_of(b"{mine:}")}
    assert len({slot_of(k.encode()) for k in plain.all()}) > 1  # why the tag is needed
