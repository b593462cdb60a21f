"""The backup's own state as ``rrb-status --storage`` reads it, from a folder and from S3."""

from __future__ import annotations

import pytest

from rrb_streams.format import manifest as mf
from rrb_streams.format.segment import new_uid, segment_name
from rrb_streams.ops.backup_state import collect_backup, render_backup
from rrb_streams.storage.base import Storage
from tests.compact.helpers import History, ago, compactor
from tests.support.restoring import put_segment

pytestmark = pytest.mark.anyio

LEVEL1_EVERY = 300.0  # overdue after 15 minutes


async def write(
    storage: Storage, history: History, count: int, start_s: float, prefix: str = ""
) -> None:
    """``count`` level-0 segments of 30 records, read from ``start_s`` ago on, 10 s apart."""
    for i in range(count):
        records = history.make(30, at_us=ago(start_s - i * 10), seed=int(start_s) + i)
        await put_segment(storage, records, prefix)


def reads(history: History) -> tuple[int, int]:
    times = [r.read_at_us for r in history.records]
    return min(times), max(times)


@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_level0_only_reports_the_newest_and_oldest_read_and_overdue_compaction(
    storage: Storage,
) -> None:
    history = History()
    await write(storage, history, 20, 3000)  # more than the indexes read at both ends
    state = await collect_backup(storage, "", level1_every=LEVEL1_EVERY)
    oldest, newest = reads(history)
    assert state.found and state.manifest == 0
    assert (state.newest_read_us, state.oldest_restorable_us) == (newest, oldest)
    assert state.levels["0"].objects == state.waiting == 20
    assert state.levels["0"].bytes > 0 and state.levels["1"].objects == 0
    assert state.waiting_since_us == oldest and state.floor_us is None
    # Segments have waited 50 minutes and nothing ever compacted them.
    assert state.overdue
    patient = await collect_backup(storage, "", level1_every=3600.0)
    assert not patient.overdue
    assert "COMPACTION OVERDUE" in render_backup(state)
    assert "compaction: none yet" in render_backup(patient)


@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_after_compaction_it_counts_levels_snapshots_and_the_last_step(
    storage: Storage,
) -> None:
    history = History()
    await write(storage, history, 12, 3000, prefix="p/")
    await compactor(storage, "p/").run_pass(snapshot=True)
    await write(storage, history, 3, 200, prefix="p/")
    state = await collect_backup(storage, "p/", level1_every=LEVEL1_EVERY)
    m = await mf.read_latest(storage, "p/")
    oldest, newest = reads(history)
    assert state.manifest == m.seq > 0 and state.manifest_written_us == m.written_us
    assert state.newest_read_us == newest and state.oldest_restorable_us == oldest
    assert state.waiting == state.levels["0"].objects == 3
    assert state.levels["snapshot"].objects >= 1 and state.snapshots == 1
    assert state.levels["1"].objects + state.levels["2"].objects >= 1
    assert state.retired.objects == 12  # the merged level 0, waiting out the grace period
    assert state.last_compaction is not None and state.last_compaction["step"] == "snapshot"
    assert state.newest_snapshot_cut_us == m.snapshots[0].cut_us
    assert not state.overdue and not state.missing and not state.unreadable
    # Two hours on with nothing compacted, the same segments are overdue.
    later = await collect_backup(storage, "p/", level1_every=LEVEL1_EVERY, now_us=ago(-7200))
    assert later.overdue
    text = render_backup(state)
    assert "last compaction step: snapshot" in text and "snapshots kept: 1" in text
    # Nothing of it is under another prefix.
    assert not (await collect_backup(storage, "", level1_every=LEVEL1_EVERY)).found


async def test_retention_sets_the_oldest_restorable_moment_and_retired_objects_count(
    storage: Storage,
) -> None:
    history = History()
    c = compactor(storage, retention=500.0)
    await write(storage, history, 10, 2000)
    await c.run_pass(snapshot=True)
    await write(storage, history, 10, 300)
    await c.run_pass(snapshot=True)
    state = await collect_backup(storage, "", level1_every=LEVEL1_EVERY)
    assert c.manifest.floor_us is not None
    assert state.floor_us == state.oldest_restorable_us == c.manifest.floor_us
    assert state.retired.objects > 10 and state.retired.bytes > 0
    assert state.snapshots == len(c.manifest.snapshots)
    assert "retention floor" in render_backup(state)


async def test_a_recent_pass_is_not_overdue_though_an_old_read_waits(storage: Storage) -> None:
    """A segment that landed late (its reads are old) right after a pass: compaction has not
    had its interval yet."""
    history = History()
    await write(storage, history, 3, 600)
    await compactor(storage).run_pass()
    await write(storage, history, 1, 3600)
    state = await collect_backup(storage, "", level1_every=LEVEL1_EVERY)
    assert state.waiting == 1 and state.waiting_since_us is not None
    assert state.waiting_since_us < ago(3000)
    assert not state.overdue


async def test_unreadable_indexes_and_missing_objects_are_named_not_fatal(
    storage: Storage,
) -> None:
    history = History()
    await write(storage, history, 4, 600)
    await compactor(storage).run_pass()
    m = await mf.read_latest(storage, "")
    (gone,) = [e.name for e in m.objects if e.level == 1]
    await storage.delete(gone)
    stamp = history.stamp + 10
    bad = segment_name("", 0, stamp, stamp, new_uid())
    await storage.put(bad, b"not a segment, and long enough to have a tail" * 4)
    await storage.flush()
    state = await collect_backup(storage, "", level1_every=LEVEL1_EVERY)
    assert state.missing == [gone]
    assert [name for name, _ in state.unreadable] == [bad]
    assert state.newest_read_us == reads(history)[1]  # from the manifest's figures
    text = render_backup(state)
    assert f"  {gone}" in text and bad in text


async def test_empty_storage_holds_no_backup(storage: Storage) -> None:
    state = await collect_backup(storage, "", level1_every=LEVEL1_EVERY)
    assert not state.found
    assert state.newest_read_us is None and state.oldest_restorable_us is None
    assert not state.overdue
