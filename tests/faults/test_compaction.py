"""Compaction end to end, with real servers: rrb-compact killed -9 at any point while uploaders
write, two compactors at once, a restore whose inputs compaction deletes under it, --at at
any moment of the window, retention, and a damaged input. Each ends with a restore compared
exactly with the source."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis

from rrb_streams.format.ranges import Range, read_footer_of
from rrb_streams.format.segment import decode_segment
from rrb_streams.format.view import moment
from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.url import StorageSpec
from tests.support.compacting import (
    Backup,
    ChangeWriter,
    ManifestLog,
    burst,
    compact,
    compact_args,
    fs_manifest,
    fs_manifest_seq,
    fs_segments,
    manifest,
    pass_report,
    pass_report_in,
    restore_cli,
    restore_summary,
    segments,
    unaccounted,
    uploaded,
    verify_cli,
)
from tests.support.dataset import Snapshot, difference, snapshot
from tests.support.pipeline import running_pipeline
from tests.support.proc import Command, one_line
from tests.support.restoring import fs_spec, restore, restore_config, source_time_us
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
FAST_SEGMENTS = {"segment_interval": 0.05}
LEASE = "rrb:compact:lease"
STANDBY = "rrb-compact: another process holds the compaction lease"


def exact(expected: Snapshot, target: RedisServer) -> None:
    with target.client() as t:
        got = snapshot(t)
    assert not difference(expected, got), difference(expected, got)


def unix(at_us: int) -> str:
    """A moment as ``--at`` takes it: Unix seconds, to the exact microsecond."""
    return f"{at_us // 1_000_000}.{at_us % 1_000_000:06d}"


async def settle_and_record(c: redis.Redis) -> tuple[int, Snapshot]:
    """Wait until every change is stored, then the source's clock and state: a moment every
    change before which was read before it, and every change after it read after it."""
    await uploaded(c)
    await anyio.sleep(0.002)
    at = source_time_us(c)
    state = snapshot(c)
    await anyio.sleep(0.002)
    return at, state


async def wait_exit(cmd: Command) -> int:
    """The exit status of ``cmd``, awaited in a worker thread (120 s at most)."""
    assert cmd.proc is not None
    return await anyio.to_thread.run_sync(cmd.proc.wait, 120)


# -- 1. rrb-compact killed -9 at any point while uploaders write ---------------------------

KILL_POINTS = ("merge", "outputs", "commit", "deletion")


def orphans_in(folder: Path) -> set[str]:
    """Objects above level 0 that the newest manifest neither names nor retired."""
    m = fs_manifest(folder)
    known = m.names | m.retired_names
    return {n for n, level in fs_segments(folder).items() if level and n not in known}


async def killed_pass(
    backup: Backup, source: RedisServer, log: Path, aim: str, delay: float, *options: str
) -> set[str]:
    """One rrb-compact pass, killed -9 as it reaches ``aim``: ``merge`` (``delay`` seconds
    after it took the lease), ``outputs`` (an output is written), ``commit`` (a version is),
    ``deletion`` (an object the last version retired is deleted). Returns what it left:
    ``outputs`` (no manifest names them), ``commit`` (a new version), ``deletion`` (objects a
    version still lists as retired are gone), ``merge`` (none of these), or ``finished``."""
    assert backup.spec.path is not None
    folder = backup.spec.path
    before = fs_manifest(folder)
    stored = fs_segments(folder)
    orphans_before = orphans_in(folder)
    compactor = backup.command("rrb-compact", *compact_args(source.url(), *options), log=log)
    compactor.start()
    proc = compactor.proc
    assert proc is not None
    took: list[float] = []
    with source.client() as c:

        def reached() -> bool:
            if proc.poll() is not None:
                return True
            if aim == "merge":
                if not took and c.exists(LEASE):
                    took.append(time.monotonic())
                return bool(took) and time.monotonic() - took[0] >= delay
            if aim == "outputs":
                return any(lv for n, lv in fs_segments(folder).items() if n not in stored)
            if aim == "commit":
                return fs_manifest_seq(folder) > before.seq
            return any(not (folder / r.name).exists() for r in before.retired)

        try:
            await until(reached, within=30, interval=0.001)
        finally:
            compactor.ensure_stopped()  # kill -9, unless it has finished
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, compactor.output()[-3000:]
            return {"finished"}
        c.delete(LEASE)  # the dead holder's lease lapses after --lease: no need to wait
    m = fs_manifest(folder)
    left = set()
    if orphans_in(folder) - orphans_before:
        left.add("outputs")
    if m.seq > before.seq:
        left.add("commit")
    if any(not (folder / r.name).exists() for r in m.retired):
        left.add("deletion")
    return left or {"merge"}


async def test_compactor_killed_9_at_every_point_while_uploaders_write_loses_nothing(
    redis_factory: Factory,
    tmp_path: Path,
    commands: list[Command],
    fault_report: Callable[..., None],
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    backup = Backup(fs_spec(folder))
    rrb = Command(
        "rrb",
        source.url(),
        "--storage",
        str(folder),
        "--no-compaction",
        "--segment-interval",
        "0.1",
        log=tmp_path / "rrb.log",
    )
    commands.append(rrb.start())
    with source.client() as c:
        await until(lambda: c.exists("rrb:changes") == 1)
    writer = ChangeWriter(source, keys=3000)
    writer.start()
    rng = random.Random(1)
    hit: dict[str, int] = dict.fromkeys((*KILL_POINTS, "finished"), 0)
    orphans: set[str] = set()
    try:
        await anyio.sleep(1.5)
        for run in range(32):
            if run >= 8 and all(hit[p] for p in KILL_POINTS):
                break
            aim = KILL_POINTS[run % len(KILL_POINTS)]
            options = ("--snapshot",) if run % 3 == 2 else ()
            log = tmp_path / f"compact{run}.log"
            delay = rng.uniform(0.0, 0.08)
            for point in await killed_pass(backup, source, log, aim, delay, *options):
                hit[point] += 1
            orphans |= orphans_in(folder)
            await anyio.sleep(rng.uniform(0.05, 0.3))  # uploaders go on writing
    finally:
        writer.stop()
    assert writer.changes > 5000
    with source.client() as c:
        await uploaded(c, within=60)
    fault_report(injected=f"kill -9 of rrb-compact: {hit}", orphans=len(orphans))
    assert all(hit[p] for p in KILL_POINTS), hit
    assert orphans, "no kill left outputs behind"

    # A clean pass finishes what the killed ones left; one more after the grace deletes what
    # it retired, orphans included.
    await compact(backup, source.url())
    retired = fs_manifest(folder).retired_names
    await compact(backup, source.url())
    stored = set(fs_segments(folder))
    assert not orphans_in(folder)
    assert not orphans & stored, "outputs of killed passes still in storage"
    assert not retired & stored, "retired objects outlived the grace"

    await restore_cli(backup, target)
    exact(snapshot(source.client()), target)
    verified = await verify_cli(backup, source)
    assert verified["exit"] == 0, verified
    assert (verified["missing"], verified["stale"], verified["extra"]) == (0, 0, 0), verified
    assert verified["checked"] == len(snapshot(source.client()))
    assert rrb.terminate() == 0, rrb.output()[-3000:]


# -- 2. two compactors at once --------------------------------------------------------------


@pytest.mark.parametrize("spec", ["s3"], indirect=True)
async def test_two_compactors_started_together_one_works_the_other_stands_by(
    redis_factory: Factory,
    storage: Storage,
    spec: StorageSpec,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    source, target = redis_factory(), redis_factory()
    backup = Backup(spec)
    rng = random.Random(2)
    history = ManifestLog(storage)
    async with (
        running_pipeline(source.url(), storage, upload=FAST_SEGMENTS),
        anyio.create_task_group() as tg,
    ):
        await tg.start(history.watch)
        with source.client() as c:
            for round_ in range(2):
                for _ in range(10):
                    burst(c, rng, 300, keys=3000)
                    await anyio.sleep(0.03)
                await uploaded(c)
                # Both at once, each taking a snapshot (the longest pass): one without
                # --json (it says so on stderr), one with --json --strict (exit 3).
                options = compact_args(source.url(), "--snapshot", as_json=False)
                plain = backup.command("rrb-compact", *options, log=tmp_path / f"a{round_}.log")
                strict = backup.command(
                    "rrb-compact",
                    *compact_args(source.url(), "--snapshot", "--strict"),
                    log=tmp_path / f"b{round_}.log",
                )
                commands.extend((plain.start(), strict.start()))
                codes = (await wait_exit(plain), await wait_exit(strict))
                a, b = plain.output(), strict.output()
                if STANDBY in a:
                    assert codes == (0, 0), (codes, a, b)
                    assert '"lost_race": false' in b and '"snapshot"' in b, b
                else:
                    assert codes == (0, 3), (codes, a, b)
                    assert '{"standby": true}' in b and "snapshot:" in a, (a, b)
                with source.client() as s:
                    assert not s.exists(LEASE), "the lease outlived its pass"
        await history.look()
        tg.cancel_scope.cancel()
    writers = history.chain()
    # One worker per round: two runs of versions, one snapshot each.
    assert len(set(writers)) == 2, writers
    m = await manifest(storage)
    assert [s.id for s in m.snapshots] == [1, 2]
    await compact(backup, source.url())
    await restore_cli(backup, target)
    exact(snapshot(source.client()), target)


async def test_a_compactor_paused_past_its_lease_commits_nothing_after_it(
    redis_factory: Factory,
    storage: Storage,
    spec: StorageSpec,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    """Paused once its first output is written; meanwhile its lease lapses, another
    compactor works, and the lease even comes back to it (a failover that lost the
    successor's writes): the manifest's create-only commit still stops it."""
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    backup = Backup(spec)
    rng = random.Random(6)
    history = ManifestLog(storage)
    async with (
        running_pipeline(source.url(), storage, upload=FAST_SEGMENTS),
        anyio.create_task_group() as tg,
    ):
        await tg.start(history.watch)
        with source.client() as c:
            for _ in range(30):
                burst(c, rng, 300, keys=3000)
                await anyio.sleep(0.03)
            await uploaded(c)
            before = set(fs_segments(folder))
            paused = backup.command(
                "rrb-compact",
                *compact_args(source.url(), "--snapshot"),
                log=tmp_path / "paused.log",
            )
            commands.append(paused.start())

            def wrote_an_output() -> bool:
                return any(level for n, level in fs_segments(folder).items() if n not in before)

            await until(wrote_an_output, interval=0.001)
            os.kill(paused.pid, signal.SIGSTOP)
            token = c.get(LEASE)
            assert token is not None
            c.delete(LEASE)  # its lease lapsed while it was paused
            await compact(backup, source.url())  # the successor, which retires its outputs
            burst(c, rng, 300, keys=3000)
            await uploaded(c)
            c.set(LEASE, token, px=120_000)  # and the lease comes back to the paused one
            os.kill(paused.pid, signal.SIGCONT)
            assert await wait_exit(paused) == 1, paused.output()[-3000:]
            assert pass_report_in(paused.output())["lost_race"] is True
            c.delete(LEASE)
        await history.look()
        tg.cancel_scope.cancel()
    writers = history.chain()
    assert writers[-1] != token.decode()
    assert not await unaccounted(storage), "the paused compactor's outputs were left behind"
    await compact(backup, source.url())
    await compact(backup, source.url())
    assert not await unaccounted(storage)
    await restore_cli(backup, target)
    exact(snapshot(source.client()), target)


# -- 3. a restore whose planned objects compaction deletes ----------------------------------


def restore_run(target: RedisServer) -> tuple[str, dict[bytes, bytes]]:
    """The restore run on ``target``: its stream, and its run hash ("" while none)."""
    with target.client() as t:
        names = list(t.scan_iter(match="rrb:restore:*:run"))
        if not names:
            return "", {}
        return names[0].decode().removesuffix(":run"), t.hgetall(names[0])


@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_a_restore_whose_planned_objects_compaction_deleted_plans_again_and_is_exact(
    redis_factory: Factory,
    storage: Storage,
    spec: StorageSpec,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    """On the folder as of a moment half-way through the writes (--at), on S3 the latest."""
    source, target = redis_factory(), redis_factory()
    backup = Backup(spec)
    rng = random.Random(3)
    async with running_pipeline(source.url(), storage, upload=FAST_SEGMENTS):
        with source.client() as c:
            for _ in range(25):  # a segment or two each
                burst(c, rng, 250, keys=2000)
                await anyio.sleep(0.06)
            halfway = await settle_and_record(c)
            for _ in range(15):
                burst(c, rng, 250, keys=2000)
                await anyio.sleep(0.06)
            latest = await settle_and_record(c)
    level0 = set(await segments(storage))
    assert len(level0) >= 20, len(level0)
    at_us, expected = halfway if spec.kind == "fs" else latest
    at = ("--at", unix(at_us)) if spec.kind == "fs" else ()

    # One slow writer and small ranges: the restore is far from done when it has planned.
    restoring = backup.command(
        "rrb-restore",
        target.url(),
        "--json",
        "-c",
        "1",
        "--range-bytes",
        "2000",
        *at,
        log=tmp_path / "restore.log",
    )
    commands.append(restoring.start())
    await until(lambda: restore_run(target)[1].get(b"plan_done") == b"1", interval=0.001)
    os.kill(restoring.pid, signal.SIGSTOP)
    stream, meta = restore_run(target)
    with target.client() as t:
        entries = t.xrange(stream)
    planned = {b.name for _, fields in entries for b in Range.from_json(fields[b"r"]).blocks}
    assert planned <= level0 and len(planned) >= 10, planned
    assert int(meta.get(b"done", 0)) < int(meta[b"planned"]) // 2, meta

    # While it is paused: level 1 takes level 0 in, and the next pass deletes it (grace 0).
    first = await compact(backup, source.url())
    assert first["steps"][0]["inputs"] == len(level0)
    second = await compact(backup, source.url())
    assert second["deleted"] >= len(level0)
    assert not planned & set(await segments(storage)), "the planned objects are still there"

    os.kill(restoring.pid, signal.SIGCONT)
    status = await wait_exit(restoring)
    assert status == 0, restoring.output()[-3000:]
    summary = restore_summary(restoring.output())
    assert summary["run_totals"]["failed"] == 0, summary
    assert summary["run_totals"]["restored"] == len(expected)
    exact(expected, target)


# -- 4. --at at many moments after level 1, level 2 and snapshots ---------------------------


async def test_at_every_recorded_moment_restores_it_after_levels_and_snapshots(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    backup = Backup(spec)
    rng = random.Random(4)
    # The pass after each phase: level 1 and level 2 (each due at every pass), or a snapshot.
    passes = [(), (), ("--snapshot",), (), (), ("--snapshot",), (), ()]
    moments: list[tuple[int, Snapshot]] = []
    async with running_pipeline(source.url(), storage, upload=FAST_SEGMENTS):
        with source.client() as c:
            moments.append(await settle_and_record(c))
            for options in passes:
                for _ in range(3):
                    burst(c, rng, 150)
                    moments.append(await settle_and_record(c))
                await compact(backup, source.url(), *options)
    final = await compact(backup, source.url())  # deletes what the last pass retired
    assert final["deleted"] > 0

    m = await manifest(storage)
    levels = {e.level for e in m.objects}
    assert {1, 2, 3} <= levels, levels
    assert len(m.snapshots) == 2
    assert any(e.sealed == 1 for e in m.objects) and any(e.sealed == 2 for e in m.objects)
    stored = await segments(storage)
    assert not [n for n, level in stored.items() if level == 0], "merged level 0 not deleted"
    assert len({repr(sorted(state.items())) for _, state in moments}) > 20

    for at_us, expected in moments:
        with target.client() as t:
            t.flushall()
        report = await restore(restore_config(target.url(), spec, at_us=at_us), storage)
        assert report.totals is not None and report.totals["failed"] == 0, report.totals
        exact(expected, target)
    # rrb-restore --at, as an operator types it (Unix seconds), and the latest state.
    at_us, expected = moments[len(moments) // 2]
    await restore_cli(backup, target, "--at", unix(at_us))
    exact(expected, target)
    await restore_cli(backup, target)
    exact(moments[-1][1], target)


# -- 5. retention --------------------------------------------------------------------------


async def test_retention_drops_history_before_the_floor_and_refuses_older_moments(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    backup = Backup(spec)
    rng = random.Random(5)
    retention = 3.0
    keep = ("--retention", f"{retention:g}s", "--snapshot")
    async with running_pipeline(source.url(), storage, upload=FAST_SEGMENTS):
        with source.client() as c:
            burst(c, rng, 400)
            at_a, _ = await settle_and_record(c)
            await compact(backup, source.url(), *keep)  # snapshot 1
            burst(c, rng, 400)
            at_b, state_b = await settle_and_record(c)
            await compact(backup, source.url(), *keep)  # snapshot 2
            first = await manifest(storage)
            assert [s.id for s in first.snapshots] == [1, 2] and first.floor_us is None
            cut_2 = first.snapshots[1].cut_us
            sealed_early = {e.name for e in first.objects if e.sealed is not None}
            parts_1 = {e.name for e in first.objects if e.snapshot == 1}
            # Until snapshot 2's cut is older than the retention: it becomes the floor.
            with source.client() as s:
                left = cut_2 + int(retention * 1e6) + 200_000 - source_time_us(s)
            await anyio.sleep(max(0, left) / 1e6)
            burst(c, rng, 400)
            at_c, state_c = await settle_and_record(c)
            await compact(backup, source.url(), *keep)  # snapshot 3, retention
            await compact(backup, source.url(), "--retention", f"{retention:g}s")  # deletes

    m = await manifest(storage)
    assert m.floor_us == cut_2
    assert [s.id for s in m.snapshots] == [2, 3]
    assert at_a < m.floor_us <= at_b < at_c
    stored = set(await segments(storage))
    # What snapshot 1 and 2 stood for, and snapshot 1 itself, are gone from storage.
    assert sealed_early and not sealed_early & stored
    assert parts_1 and not parts_1 & stored
    assert not await unaccounted(storage)

    await restore_cli(backup, target)
    exact(state_c, target)
    for at_us, expected in ((m.floor_us, state_b), (at_b, state_b), (at_c, state_c)):
        await restore_cli(backup, target, "--at", unix(at_us))
        exact(expected, target)
    # A microsecond before the floor: refused, in one line naming the oldest restorable moment.
    with target.client() as t:
        t.flushall()
    done = await backup.arun("rrb-restore", target.url(), "--at", unix(m.floor_us - 1))
    assert done.returncode == 2, (done.stdout, done.stderr)
    line = one_line(done.stderr, logs=True)
    assert "oldest restorable moment" in line and moment(m.floor_us) in line, line
    with target.client() as t:
        assert t.dbsize() == 0


# -- 6. a damaged input --------------------------------------------------------------------


async def test_a_damaged_level0_block_is_named_set_aside_and_its_keys_fail_the_restore(
    redis_factory: Factory, storage: Storage, spec: StorageSpec, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    backup = Backup(spec)
    keys = [b"k:%04d" % i for i in range(300)]
    rounds: list[set[str]] = []
    async with running_pipeline(source.url(), storage, upload=FAST_SEGMENTS):
        with source.client() as c:
            seen: set[str] = set()
            # Every key twice, then the last third again: a damaged block of the second round
            # has older records of its keys elsewhere, and newer ones for some of them.
            for r, chosen in enumerate((keys, keys, keys[200:])):
                pipe = c.pipeline(transaction=False)
                for k in chosen:
                    pipe.set(k, b"r%d-" % r + k)
                pipe.execute()
                await uploaded(c)
                now = set(await segments(storage))
                rounds.append(now - seen)
                seen = now
        expected = snapshot(source.client())
    assert all(rounds), rounds
    damaged = sorted(rounds[1])[0]
    path = tmp_path / "backup" / damaged
    footer = await read_footer_of(storage, ObjectInfo(damaged, path.stat().st_size))
    block = footer.blocks[0]
    # The keys the block leaves undecided: those of its span whose newest record elsewhere is
    # not newer than the block's newest (rrb_streams.format.ranges.Damage.covers); a key it
    # alone holds is lost with it.
    newest: dict[bytes, int] = {}
    only_there: set[bytes] = set()
    for name in {n for r in rounds for n in r}:
        _, blocks = decode_segment((tmp_path / "backup" / name).read_bytes(), name)
        for i, records in enumerate(blocks):
            assert not isinstance(records, Exception)
            if (name, i) == (damaged, 0):
                only_there |= {rec.key for rec in records}
                continue
            for rec in records:
                newest[rec.key] = max(newest.get(rec.key, 0), rec.stamp)
    only_there -= set(newest)
    first, last = block.first[1], block.last[1]
    undecided = {
        k for k, stamp in newest.items() if first <= k <= last and stamp <= block.max_stamp
    }
    assert undecided
    data = bytearray(path.read_bytes())
    data[block.offset + block.length // 2] ^= 0xFF  # inside the first block
    path.write_bytes(bytes(data))

    done = await backup.arun("rrb-compact", *compact_args(source.url()))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"damaged input left as it is: {damaged}" in done.stderr, done.stderr
    report = pass_report(done)
    assert [d["object"] for d in report["damaged"]] == [damaged]
    total = sum(len(r) for r in rounds)
    assert [s["inputs"] for s in report["steps"]] == [total - 1]
    m = await manifest(storage)
    assert [e.name for e in m.objects if e.damaged] == [damaged]
    assert m.retired_names == {n for r in rounds for n in r} - {damaged}
    assert m.live(1)
    await compact(backup, source.url())  # the merged inputs are deleted; it stays
    assert set(await segments(storage)) & {n for r in rounds for n in r} == {damaged}

    with target.client() as t:
        t.flushall()
    done = await backup.arun("rrb-restore", target.url(), "--json")
    assert done.returncode == 3, (done.stdout[-2000:], done.stderr[-2000:])
    summary = restore_summary(done)
    failed = {f["object"] for f in summary["failures"]}
    assert f"{damaged}@{block.offset}" in failed
    # Keys of the block with no newer record elsewhere: failed, named, and not restored
    # from their older record. The others: exactly the source's value.
    assert {f"db0:{k.decode()}" for k in undecided} <= failed
    assert summary["run_totals"]["failed"] == len(undecided) + 1, summary["failures"]
    with target.client() as t:
        got = snapshot(t)
    lost = undecided | only_there
    assert {k for _, k in set(expected) - set(got)} == lost
    assert {key: value for key, value in expected.items() if key[1] not in lost} == got
