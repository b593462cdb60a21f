"""Compaction passes against storage in memory: every moment reads the same before and after."""

from __future__ import annotations

import anyio
import pytest

from rrb_streams.compact.compactor import (
    FAN_IN,
    MERGE_BYTES,
    Compactor,
    PassReport,
    Schedule,
    _groups,
)
from rrb_streams.format import manifest as mf
from rrb_streams.format.merge import RUN_BYTES
from rrb_streams.format.ranges import (
    FooterStats,
    plan_ranges,
    read_footer_of,
    read_footers,
    read_range,
)
from rrb_streams.format.segment import parse_segment_name
from rrb_streams.format.view import BeforeRetention, read_view
from rrb_streams.logs import get_logger
from rrb_streams.storage.memory import MemoryStorage
from tests.compact.helpers import History, ago, compactor, stored
from tests.support.restoring import put_segment

pytestmark = pytest.mark.anyio


async def levels(storage: MemoryStorage) -> dict[int, int]:
    out: dict[int, int] = {}
    async for info in storage.list("segments/"):
        parsed = parse_segment_name(info.name)
        assert parsed is not None
        out[parsed.level] = out.get(parsed.level, 0) + 1
    return out


async def test_level1_merges_level0_and_every_moment_reads_the_same() -> None:
    storage, history = MemoryStorage(), History()
    moments = []
    for i in range(40):
        at = ago(1000 - i * 10)
        await history.write(storage, 30, at_us=at, seed=i)
        moments.append(at + 15)
    before = {t: await stored(storage, t) for t in moments[::5]}
    report = await compactor(storage, level2_every=3600.0).run_pass()
    assert [s.step for s in report.steps] == ["level1"]
    assert report.steps[0].inputs == 40 and report.steps[0].records_in == 1200
    m = await mf.read_latest(storage, "")
    assert m.seq >= 1 and len(m.live(1)) == 1  # 40 small inputs: one merge
    for t, found in before.items():
        assert await stored(storage, t) == found == history.truth(t)
    assert await stored(storage) == history.truth()


async def test_a_snapshot_stands_for_what_it_merged_and_keeps_history_for_the_window() -> None:
    storage, history = MemoryStorage(), History()
    c = compactor(storage)
    moments = []
    for round_ in range(3):
        for i in range(10):
            at = ago(3000 - round_ * 1000 - i * 20)
            await history.write(storage, 20, at_us=at, seed=round_ * 100 + i)
            moments.append(at + 10)
        report = await c.run_pass(snapshot=round_ == 1)
        assert not report.lost
    m = c.manifest
    assert len(m.snapshots) == 1 and m.floor_us is None
    view = await read_view(storage, "")
    assert view.base is not None
    # The latest state reads the snapshot and what came after it, not the sealed history.
    sealed = {e.name for e in m.objects if e.sealed is not None}
    assert sealed and not sealed & {i.name for i in view.objects}
    for t in moments:
        assert await stored(storage, t) == history.truth(t), t
    assert await stored(storage) == history.truth()


async def test_retention_collapses_history_before_the_floor_and_refuses_older_moments() -> None:
    storage, history = MemoryStorage(), History()
    c = compactor(storage, retention=500.0, grace=0.0)
    for i in range(10):
        await history.write(storage, 20, at_us=ago(2000 - i * 10), seed=i)
    await c.run_pass(snapshot=True)  # cut about 1900 s ago: older than the window
    for i in range(10):
        await history.write(storage, 20, at_us=ago(300 - i * 10), seed=50 + i)
    await c.run_pass(snapshot=True)
    await c.run_pass()  # deletes what retention retired (grace 0)
    m = c.manifest
    # The first snapshot is the base of the window's oldest moments; what it sealed is gone.
    assert m.floor_us == m.snapshots[0].cut_us and len(m.snapshots) == 2
    assert not [e for e in m.objects if e.sealed == 1]
    assert await stored(storage) == history.truth()
    for t in (m.floor_us, ago(250), ago(100), ago(0)):
        assert await stored(storage, t) == history.truth(t)
    with pytest.raises(BeforeRetention, match="oldest restorable moment"):
        await stored(storage, m.floor_us - 1)
    # Everything before the floor is gone from storage, not only from the manifest.
    assert (await levels(storage)).get(0, 0) == 0


async def test_tombstones_older_than_the_window_leave_the_snapshot() -> None:
    storage, history = MemoryStorage(), History()
    c = compactor(storage, retention=100.0)
    await history.write(storage, 50, at_us=ago(1000), seed=1)
    dead = history.make(1, at_us=ago(900), seed=2, deletes=1.0)
    await put_segment(storage, dead)
    await c.run_pass(snapshot=True)
    m = c.manifest
    assert m.snapshots[-1].keys == len(history.truth())
    assert await stored(storage) == history.truth()


async def test_a_damaged_input_is_named_set_aside_and_still_read() -> None:
    storage, history = MemoryStorage(), History()
    names = [await history.write(storage, 20, at_us=ago(500 - i), seed=i) for i in range(4)]
    data = bytearray(storage.objects[names[1]])
    data[20] ^= 0xFF  # inside the first block
    storage.objects[names[1]] = bytes(data)
    report = await compactor(storage).run_pass()
    assert [n for n, _ in report.damaged] == [names[1]]
    m = await mf.read_latest(storage, "")
    damaged = [e for e in m.objects if e.damaged]
    assert [e.name for e in damaged] == [names[1]]
    assert report.steps and report.steps[0].inputs == 3
    # Readers still see the damaged object, and report it rather than deciding its keys.
    view = await read_view(storage, "")
    assert (names[1], len(data)) in {(i.name, i.size) for i in view.objects}
    blocks = await read_footers(storage, "", stats=FooterStats())
    read = await read_range(storage, plan_ranges(blocks)[0])
    assert {d.name for d in read.damaged} == {names[1]} and read.undecided


async def test_two_compactors_at_once_one_commits_the_loser_deletes_its_outputs() -> None:
    storage, history = MemoryStorage(), History()
    for i in range(10):
        await history.write(storage, 20, at_us=ago(500 - i), seed=i)
    reports: list[PassReport] = []

    async def one() -> None:
        reports.append(await compactor(storage, level2_every=3600.0).run_pass())

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert sorted(r.lost for r in reports) == [False, True]
    m = await mf.read_latest(storage, "")
    assert [seq for seq, _ in await mf.manifest_names(storage, "")] == list(range(1, m.seq + 1))
    above = [i.name async for i in storage.list("segments/1/")]
    assert set(above) == m.names  # the loser's outputs are gone
    assert await stored(storage) == history.truth()


async def test_a_compactor_that_lost_the_lease_commits_nothing() -> None:
    storage, history = MemoryStorage(), History()
    await history.write(storage, 20, at_us=ago(500), seed=1)

    async def never() -> bool:
        return False

    c = Compactor(storage, "", Schedule(), get_logger("compact"), holds=never)
    report = await c.run_pass()
    assert report.lost and not report.steps
    assert await mf.manifest_names(storage, "") == []
    assert [i.name async for i in storage.list("segments/1/")] == []


async def test_a_history_of_more_runs_than_one_merge_reads_still_makes_a_snapshot() -> None:
    storage, history = MemoryStorage(), History()
    c = compactor(storage, level2_every=3600.0, part_bytes=1024)  # 1 KiB parts: many per run
    for i in range(FAN_IN + 3):
        await history.write(storage, 40, at_us=ago(900 - i * 10), seed=i)
        await c.run_pass()  # each pass's level-1 merge is one run
    runs = {e.run for e in c.manifest.objects if e.level == 1}
    assert len(runs) == FAN_IN + 3
    with anyio.fail_after(30):
        report = await c.run_pass(snapshot=True)
    assert [s.step for s in report.steps] == ["level2", "snapshot"]
    assert len(c.manifest.snapshots) == 1
    assert await stored(storage) == history.truth()
    for t in (ago(850), ago(600)):
        assert await stored(storage, t) == history.truth(t)


def test_merges_are_cut_by_memory_and_always_join_at_least_two_runs() -> None:
    big = [[(f"b{i}", None)] for i in range(100)]  # each costs a whole run buffer
    sizes = {f"b{i}": 10 * RUN_BYTES for i in range(100)}
    groups = _groups(big, sizes)  # type: ignore[arg-type]
    assert all(2 <= len(g) <= MERGE_BYTES // RUN_BYTES for g in groups[:-1])
    assert sum(map(len, groups)) == 100
    huge = [[("h0", None)], [("h1", None)]]
    assert len(_groups(huge, {"h0": 1 << 40, "h1": 1 << 40})) == 1  # type: ignore[arg-type]


async def test_a_snapshot_of_many_parts_is_read_in_key_order_by_the_next_one() -> None:
    storage, history = MemoryStorage(), History()
    c = compactor(storage, part_bytes=512)  # dozens of parts per snapshot
    for round_ in range(3):
        for i in range(10):
            await history.write(
                storage, 20, at_us=ago(900 - round_ * 200 - i), seed=round_ * 50 + i
            )
        report = await c.run_pass(snapshot=True)
        assert not report.damaged, report.damaged
    parts = c.manifest.snapshot_parts(c.manifest.snapshots[-1].id)
    assert len(parts) > 10 and [e.part for e in parts] == list(range(len(parts)))
    async for info in storage.list("segments/"):
        await read_footer_of(storage, info)  # every output's index is valid
    assert await stored(storage) == history.truth()
