"""One compaction pass: merge what is due, apply retention, commit, delete what is retired.

A pass, holding the compaction lease (:mod:`rrb_streams.compact.lease`), in this order:

1. **Delete** objects the newest manifest retired more than ``grace`` ago. Any reader that
   planned with them has had ``grace`` to read them, and a reader that still finds one gone
   plans its range again from the newest manifest (:func:`read_range_fresh`).
2. **Level 1** (every ``level1_every``): the level-0 segments, merged ``FAN_IN`` at a time.
3. **Level 2** (every ``level2_every``): the level-1 objects, merged likewise.
4. **Snapshot** (every ``snapshot_every``): the previous snapshot's parts and every unsealed
   object, merged keeping the newest record per key, cut into parts of ``part_bytes``. The
   objects it merged are *sealed* by it, not retired: reads before its cut still need them.
5. **Retention**: the newest snapshot cut at or before ``now - retention`` becomes the
   floor; older snapshots and everything sealed by it or older are retired.
6. **Orphans**: objects above level 0 that no manifest names (a pass killed after writing
   outputs and before committing) are retired, to be deleted after ``grace``.

Each step commits a new manifest version (:func:`rrb_streams.format.manifest.commit`) after
its outputs are durable, so a pass killed at any moment leaves the previous version whole,
and a compactor that lost the race for a version deletes its outputs and stops.

A damaged input (a block that fails its checksum, an unreadable index) is named in the log
and marked ``damaged`` in the manifest; the step runs again without it. It is never merged,
sealed or retired: readers keep reading it and report its keys, so its damage never hides
inside a clean-looking output.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format import manifest as mf
from rrb_streams.format.manifest import Entry, Manifest, Retired, Snapshot
from rrb_streams.format.merge import (
    PART_BYTES,
    RUN_BYTES,
    DamagedInput,
    MergeStats,
    Policy,
    keep_all,
    keep_newest,
    merge,
)
from rrb_streams.format.ranges import read_footer_of
from rrb_streams.format.segment import Footer, new_uid, parse_segment_name
from rrb_streams.format.view import level0, list_segments
from rrb_streams.storage.base import ObjectInfo, Storage

FAN_IN = 32  # objects one snapshot merge reads at once, besides the previous snapshot
# A level merge takes inputs while the runs it holds at once (one per input, up to
# RUN_BYTES each) stay within this: hundreds of small level-0 segments make one output.
MERGE_BYTES = 32 << 20
MAX_INPUTS = 512
_FOOTER_READERS = 8
STEPS = ("level1", "level2", "snapshot")


@dataclass(frozen=True)
class Schedule:
    """How often each step runs, how long history is kept, and when retired objects go."""

    level1_every: float = 300.0
    level2_every: float = 3600.0
    snapshot_every: float = 86400.0
    retention: float = 86400.0
    grace: float = 600.0
    part_bytes: int = PART_BYTES


@dataclass
class StepReport:
    step: str
    inputs: int = 0
    outputs: int = 0
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


@dataclass
class PassReport:
    """What one pass did, for ``--json``, the logs and the metrics."""

    seq: int = 0  # the manifest version it left
    steps: list[StepReport] = field(default_factory=list)
    deleted: int = 0
    retired: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)
    lost: bool = False  # another compactor committed first: this pass stopped
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.seq,
            "steps": [vars(s) for s in self.steps],
            "deleted": self.deleted,
            "retired": self.retired,
            "damaged": [{"object": n, "reason": r} for n, r in self.damaged],
            "lost_race": self.lost,
            "seconds": round(self.seconds, 3),
        }


class LostRace(Exception):
    """Another compactor committed the version this pass built on: stop the pass."""


def now_us() -> int:
    return time.time_ns() // 1000


class Compactor:
    """Runs passes over the backup under ``prefix``. ``holds`` renews the lease, and says
    whether it is still ours, before each commit."""

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        schedule: Schedule,
        log: Any,
        *,
        holds: Callable[[], Awaitable[bool]],
        writer: str = "",
    ) -> None:
        self._storage = storage
        self._prefix = prefix
        self._s = schedule
        self._log = log
        self._holds = holds
        self._writer = writer
        self._m = Manifest()
        self._damaged: list[tuple[str, str]] = []
        self._sizes: dict[str, int] = {}  # of the inputs seen: a damaged one keeps its size

    async def run_pass(self, *, snapshot: bool = False) -> PassReport:
        """One pass; ``snapshot`` takes a snapshot now whatever the schedule says."""
        started = time.monotonic()
        report = PassReport()
        self._damaged = report.damaged
        self._m = await mf.read_latest(self._storage, self._prefix)
        try:
            await self._delete_retired(report)
            snapshot = snapshot or self._due("snapshot")
            if self._due("level1") or snapshot:
                await self._level((0,), 1, report)
            if self._due("level2") or snapshot:
                await self._level((1,), 2, report)
            if snapshot:
                while len(_runs(self._history())) >= FAN_IN:  # one merge must read them all
                    await self._level((1, 2), 2, report)
                await self._snapshot(report)
            await self._retention(report)
            await self._orphans(report)
        except LostRace:
            report.lost = True
            self._log.warning("compact.lost_race", manifest=self._m.seq)
        report.seq = self._m.seq
        report.seconds = time.monotonic() - started
        return report

    @property
    def manifest(self) -> Manifest:
        """The version the last pass left (or found)."""
        return self._m

    def _due(self, step: str) -> bool:
        every = {
            "level1": self._s.level1_every,
            "level2": self._s.level2_every,
            "snapshot": self._s.snapshot_every,
        }[step]
        last = self._m.due.get(step)
        if last is None:
            # First pass ever: start the clocks; merge level 0 at once, wait for the rest.
            return step == "level1"
        return now_us() - last >= every * 1e6

    # -- steps ------------------------------------------------------------------------------

    async def _level(self, sources: tuple[int, ...], target: int, report: PassReport) -> None:
        """Merge the unsealed objects of ``sources`` into ``target``: as many runs at once as
        fit :data:`MERGE_BYTES`, each merge's outputs one new run."""
        step = f"level{target}"
        while True:
            chains = await self._inputs(sources)
            if len(chains) < (1 if sources == (0,) else 2):
                return
            footers = await self._footers([i for chain in chains for i in chain])
            if footers is None:
                continue  # a damaged input was set aside: list again
            found = dict(footers)
            inputs = [[(i.name, found[i.name]) for i in c if i.name in found] for c in chains]
            sizes = {i.name: i.size for c in chains for i in c}
            done = StepReport(step, inputs=len(footers))
            started = time.monotonic()
            retire: list[str] = []
            added: list[Entry] = []
            for group in _groups([c for c in inputs if c], sizes):
                stats = await self._merge(group, keep_all, target)
                if stats is None:
                    break
                retire += [name for chain in group for name, _ in chain]
                added += _entries(stats, target)
                _count(done, stats)
            else:
                done.seconds = time.monotonic() - started
                m = self._retire(mf.with_entries(self._m, retire, added), retire)
                report.retired += len(retire)
                await self._commit(replace(m, due={**m.due, step: now_us()}), done, added)
                report.steps.append(done)
                return
            # A damaged input stopped a merge: what was merged before it is not committed.
            await self._discard([e.name for e in added])

    async def _inputs(self, levels: tuple[int, ...]) -> list[list[ObjectInfo]]:
        """The unsealed objects of ``levels`` as runs: one per merge that wrote them, and
        one per level-0 segment."""
        m = self._m
        out = _runs([e for lv in levels if lv > 0 for e in m.live(lv)])
        if 0 in levels:
            known = m.names
            zero = await level0(self._storage, self._prefix, m)
            out += [[i] for i in zero if i.name not in known]
        return out

    async def _snapshot(self, report: PassReport) -> None:
        while True:
            m = self._m
            previous = m.base_for(None)
            parts = m.snapshot_parts(previous.id) if previous is not None else []
            history = self._history()
            if not history:
                return
            infos = [ObjectInfo(e.name, e.size) for e in (*parts, *history)]
            footers = await self._footers(infos)
            if footers is None:
                continue
            by_name = dict(footers)
            runs = ([[ObjectInfo(e.name, e.size) for e in parts]] if parts else []) + _runs(history)
            chains = [[(i.name, by_name[i.name]) for i in run] for run in runs]
            done = StepReport("snapshot", inputs=len(footers))
            started = time.monotonic()
            drop_before = now_us() - int(self._s.retention * 1e6)
            stats = await self._merge(chains, keep_newest(drop_before), mf.SNAPSHOT_LEVEL)
            if stats is None:
                continue
            _count(done, stats)
            done.seconds = time.monotonic() - started
            sid = max((s.id for s in m.snapshots), default=0) + 1
            cut = max(stats.max_read_us, previous.cut_us if previous else 0)
            sealed = {e.name for e in history}
            objects = tuple(replace(e, sealed=sid) if e.name in sealed else e for e in m.objects)
            new_parts = tuple(replace(e, snapshot=sid) for e in _entries(stats, mf.SNAPSHOT_LEVEL))
            snap = Snapshot(sid, cut, now_us(), stats.records_out)
            m = replace(
                m,
                objects=objects + new_parts,
                snapshots=(*m.snapshots, snap),
                due={**m.due, "snapshot": now_us()},
            )
            await self._commit(m, done, new_parts)
            report.steps.append(done)
            self._log.info(
                "compact.snapshot", id=sid, cut_us=cut, keys=stats.records_out, parts=len(new_parts)
            )
            return

    async def _retention(self, report: PassReport) -> None:
        m = self._m
        cutoff = now_us() - int(self._s.retention * 1e6)
        keep = max((s for s in m.snapshots if s.cut_us <= cutoff), key=lambda s: s.id, default=None)
        if keep is None:
            return
        dropped = {s.id for s in m.snapshots if s.id < keep.id}
        retire = [
            e.name
            for e in m.objects
            if (e.snapshot in dropped) or (e.sealed is not None and e.sealed <= keep.id)
        ]
        if not retire and m.floor_us == keep.cut_us:
            return
        m = mf.with_entries(m, retire, ())
        m = self._retire(m, retire)
        m = replace(
            m,
            snapshots=tuple(s for s in m.snapshots if s.id not in dropped),
            floor_us=keep.cut_us,
        )
        await self._commit(m, None)
        report.retired += len(retire)
        self._log.info("compact.retention", floor_us=keep.cut_us, retired=len(retire))

    async def _orphans(self, report: PassReport) -> None:
        """Retire objects above level 0 that no manifest names: outputs of a pass that died
        before its commit. Never deleted at once: a paused compactor might still commit them
        (if no version was committed since it read), so they wait out ``grace`` first."""
        m = self._m
        known = m.names | m.retired_names
        orphans = []
        for level in (1, 2, mf.SNAPSHOT_LEVEL):
            orphans += [
                i.name
                async for i in list_segments(self._storage, self._prefix, level)
                if i.name not in known
            ]
        if orphans:
            await self._commit(self._retire(m, orphans), None)
            report.retired += len(orphans)
            self._log.info("compact.orphans_retired", count=len(orphans))

    async def _delete_retired(self, report: PassReport) -> None:
        m = self._m
        limit = now_us() - int(self._s.grace * 1e6)
        old = [r for r in m.retired if r.at_us <= limit]
        if not old:
            return
        for r in old:
            await self._storage.delete(r.name)
        await self._storage.flush()
        gone = {r.name for r in old}
        m = replace(m, retired=tuple(r for r in m.retired if r.name not in gone))
        await self._commit(m, None)
        report.deleted += len(old)

    # -- helpers ----------------------------------------------------------------------------

    def _history(self) -> list[Entry]:
        """Objects a snapshot would merge: unsealed, undamaged, above level 0."""
        return [
            e
            for e in self._m.objects
            if e.snapshot is None and e.sealed is None and not e.damaged and e.level > 0
        ]

    async def _footers(self, infos: Sequence[ObjectInfo]) -> list[tuple[str, Footer]] | None:
        """The inputs' verified indexes, in the order of ``infos``, or ``None`` after marking
        a damaged one. Fetched :data:`_FOOTER_READERS` at a time: a pass may merge hundreds
        of level-0 segments."""
        found: dict[str, Footer] = {}
        failed: list[tuple[ObjectInfo, str]] = []
        known = self._m.names
        limiter = anyio.CapacityLimiter(_FOOTER_READERS)

        async def one(info: ObjectInfo) -> None:
            self._sizes[info.name] = info.size
            async with limiter:
                try:
                    found[info.name] = await read_footer_of(self._storage, info)
                except ObjectNotFound as exc:
                    if info.name in known:  # else level 0, merged by a version not read yet
                        failed.append((info, f"{info.name}: gone from storage ({exc})"))
                except CorruptObject as exc:
                    failed.append((info, str(exc)))

        async with anyio.create_task_group() as tg:
            for info in infos:
                tg.start_soon(one, info)
        if failed:
            info, reason = min(failed, key=lambda f: f[0].name)
            await self._mark_damaged(info, reason)
            return None
        return [(i.name, found[i.name]) for i in infos if i.name in found]

    async def _merge(
        self, chains: list[list[tuple[str, Footer]]], policy: Policy, level: int
    ) -> MergeStats | None:
        written: list[str] = []
        try:
            return await merge(
                self._storage,
                chains,
                policy=policy,
                prefix=self._prefix,
                level=level,
                part_bytes=self._s.part_bytes,
                written=written,
                on_progress=lambda stats: self._log.info(
                    "compact.progress",
                    level=level,
                    records_in=stats.records_in,
                    records_out=stats.records_out,
                    bytes_in=stats.bytes_in,
                    bytes_out=stats.bytes_out,
                ),
            )
        except DamagedInput as exc:
            await self._discard(written)
            await self._mark_damaged(ObjectInfo(exc.name, self._sizes.get(exc.name, 0)), str(exc))
            return None
        except BaseException:
            with anyio.CancelScope(shield=True):  # cancelled too: leave no orphan behind
                await self._discard(written)
            raise

    async def _mark_damaged(self, info: ObjectInfo, reason: str) -> None:
        self._log.error("compact.damaged_input", object=info.name, reason=reason)
        m = self._m
        existing = next((e for e in m.objects if e.name == info.name), None)
        if existing is not None:
            entry = replace(existing, damaged=reason)
        else:
            parsed = parse_segment_name(info.name, self._prefix)
            level = parsed.level if parsed is not None else 0
            low = parsed.min_stamp if parsed is not None else 0
            high = parsed.max_stamp if parsed is not None else 0
            entry = Entry(info.name, level, info.size, 0, low, high, 0, 0, damaged=reason)
        await self._commit(mf.with_entries(m, [info.name], [entry]), None)
        self._damaged.append((info.name, reason))

    async def _discard(self, names: Sequence[str]) -> None:
        for name in names:
            await self._storage.delete(name)

    def _retire(self, m: Manifest, names: Sequence[str]) -> Manifest:
        at = now_us()
        have = m.retired_names
        return replace(m, retired=(*m.retired, *(Retired(n, at) for n in names if n not in have)))

    async def _commit(
        self, m: Manifest, step: StepReport | None, outputs: Sequence[Entry] = ()
    ) -> None:
        """Commit ``m`` as the next version. When the lease or the version is lost, delete
        ``outputs`` (no version names them) and raise :class:`LostRace`."""
        at = now_us()
        last = self._m.last if step is None else {**vars(step), "at_us": at}
        # A step's clock starts with the first version: a new backup snapshots a day later.
        due = {**{s: at for s in STEPS}, **m.due}
        new = replace(
            m, seq=self._m.seq + 1, written_us=at, writer=self._writer, last=last, due=due
        )
        if not await self._holds() or not await mf.commit(self._storage, self._prefix, new):
            await self._discard([e.name for e in outputs])
            raise LostRace
        self._m = new
        await mf.prune(self._storage, self._prefix)


def _runs(entries: Sequence[Entry]) -> list[list[ObjectInfo]]:
    """``entries`` as runs in key order: the outputs of one merge together (its parts in
    order), any other object alone."""
    runs: dict[str, list[Entry]] = {}
    alone: list[list[ObjectInfo]] = []
    for e in entries:
        if e.run is None:
            alone.append([ObjectInfo(e.name, e.size)])
        else:
            runs.setdefault(e.run, []).append(e)
    ordered = (sorted(run, key=lambda e: e.part) for run in runs.values())
    return [[ObjectInfo(e.name, e.size) for e in run] for run in ordered] + alone


def _groups(
    runs: list[list[tuple[str, Footer]]], sizes: dict[str, int]
) -> list[list[list[tuple[str, Footer]]]]:
    """``runs`` cut into merges that each hold at most :data:`MERGE_BYTES` of fetched data
    (a run holds one object's fetch at a time) and at least two runs, so that merging runs
    always leaves fewer of them."""
    groups: list[list[list[tuple[str, Footer]]]] = []
    held = 0
    for run in runs:
        size = max(min(sizes.get(name, RUN_BYTES), RUN_BYTES) for name, _ in run)
        full = held + size > MERGE_BYTES and len(groups[-1]) >= 2 if groups else True
        if full or len(groups[-1]) >= MAX_INPUTS:
            groups.append([])
            held = 0
        groups[-1].append(run)
        held += size
    return groups


def _entries(stats: MergeStats, level: int) -> list[Entry]:
    run = new_uid()
    return [
        Entry(
            o.name,
            level,
            o.size,
            o.records,
            o.min_stamp,
            o.max_stamp,
            o.min_read_us,
            o.max_read_us,
            run=run,
            part=o.part,
        )
        for o in stats.outputs
    ]


def _count(done: StepReport, stats: MergeStats) -> None:
    done.outputs += len(stats.outputs)
    done.records_in += stats.records_in
    done.records_out += stats.records_out
    done.bytes_in += stats.bytes_in
    done.bytes_out += stats.bytes_out
