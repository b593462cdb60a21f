"""The restore planner: from the storage listing into the restore stream, resumably.

One process of a run plans at a time, holding the run's planner lock (see :class:`Planner`).
The listing streams page by page; items go into the stream in chunks, each chunk in one
transaction with the cursor that records it (:meth:`RunState.add`), so a planner killed at
any moment resumes at the chunk after the last one recorded, and adds nothing twice.

Items go ``batch_size`` to a stream entry. The stream is bounded: while ``max_backlog``
objects are planned and not yet written the planner waits, and it trims what every writer
acknowledged as it goes, so a restore of millions of keys does not grow the target's memory
by millions of names.

:func:`preview` is the same selection without Redis, for ``--dry-run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from rrb_streams.config import RestoreConfig
from rrb_streams.format.legacy import parse_legacy_name
from rrb_streams.format.ranges import (
    FooterStats,
    plan_ranges,
    range_key_in,
    range_key_out,
    read_footers,
)
from rrb_streams.format.selection import Item, PlanStats, has_keys_layout, legacy_rank, select
from rrb_streams.restore.state import RunState
from rrb_streams.storage.base import Storage
from rrb_streams.wire.group import trim

CHUNK = 1000  # items per transaction
FOREIGN_SHOWN = 10  # names of foreign objects logged, per planning pass
_BACKLOG_POLL = 0.2
_TRIM_EVERY = 10  # chunks
_RANGES_PER_CALL = 50  # key ranges added per transaction


def list_prefix(cfg: RestoreConfig) -> str:
    """Where the listing starts: with ``--db N``, only that db's folder."""
    if cfg.db is not None:
        return f"{cfg.path_prefix}db{cfg.db}/"
    return cfg.path_prefix


class Planner:
    """Plans one run into its stream. Call :meth:`run` while holding the planner lock."""

    def __init__(self, cfg: RestoreConfig, storage: Storage, state: RunState, log: Any) -> None:
        self._cfg = cfg
        self._storage = storage
        self._state = state
        self._log = log
        self._foreign_shown = 0
        self._flushes = 0

    async def run(self) -> None:
        """Plan from the recorded cursor to the end, then mark the plan done.

        Storage and Redis errors propagate; the caller retries, and the next call resumes
        from the cursor.
        """
        if self._cfg.legacy:
            await self._run_legacy()
        else:
            await self._run_rrb()

    async def _run_rrb(self) -> None:
        _, phase = await self._state.cursor()
        if phase != "keys":
            await self._plan_ranges()
        await self._plan_keys()

    async def _plan_ranges(self) -> None:
        """The segment layout: every segment's block index, cut into key ranges."""
        cfg, state = self._cfg, self._state
        footers = FooterStats()
        blocks = await read_footers(self._storage, cfg.path_prefix, stats=footers, at_us=cfg.at_us)
        for name, reason in footers.damaged:
            self._log.error("restore.segment_damaged", object=name, reason=reason)
        ranges = plan_ranges(blocks, budget=cfg.range_bytes, at_us=cfg.at_us, db=cfg.db)
        # Resumed: the ranges up to the cursor were added already. Cut again from a fresh
        # listing, the ranges may end elsewhere: start the first new one at the cursor.
        cursor = await state.range_cursor()
        if cursor is not None:
            start = range_key_in(cursor)
            ranges = [r for r in ranges if r.hi is None or start is None or r.hi > start]
            if ranges and start is not None:
                first = ranges[0]
                ranges[0] = replace(first, lo=max(first.lo or start, start))
        mixed = bool(blocks) and await has_keys_layout(self._storage, cfg.path_prefix)
        if footers.damaged:
            await state.add_failures([(name, reason) for name, reason in footers.damaged])
        for i in range(0, max(1, len(ranges)), _RANGES_PER_CALL):
            chunk = ranges[i : i + _RANGES_PER_CALL]
            await self._wait_for_room()
            last = i + _RANGES_PER_CALL >= len(ranges)
            await state.add_ranges(
                chunk,
                listed=0 if i else footers.segments + len(footers.damaged),
                mixed=mixed,
                cursor=range_key_out(chunk[-1].hi) if chunk else "null",
                done=last,
            )
        self._log.info(
            "restore.planned_segments",
            segments=footers.segments,
            blocks=footers.blocks,
            ranges=len(ranges),
            damaged=len(footers.damaged),
            mixed=mixed,
        )
        if mixed:
            # Keys-layout objects go after every range is written: a key that a range
            # restored (and compared with its keys-layout object) is left alone then.
            while await state.backlog() > 0:  # noqa: ASYNC110 - the backlog lives in Redis
                await anyio.sleep(_BACKLOG_POLL)

    async def _plan_keys(self) -> None:
        cfg, state = self._cfg, self._state
        after, _ = await state.cursor()
        mixed = await state.is_mixed()
        stats = PlanStats()
        flushed = PlanStats()
        chunk: list[Item] = []

        async def flush(done: bool) -> None:
            await self._wait_for_room()
            cursor = chunk[-1].group if chunk else None
            if mixed and chunk:
                keep = await state.unseen([item.group for item in chunk])
                stats.superseded += len(chunk) - sum(keep)
                chunk[:] = [item for item, k in zip(chunk, keep, strict=True) if k]
            await state.add(
                chunk,
                per_entry=cfg.batch_size,
                cursor=cursor,
                done=done,
                listed=stats.listed - flushed.listed,
                foreign=stats.foreign - flushed.foreign,
                absent_planned=stats.absent - flushed.absent,
            )
            flushed.listed, flushed.foreign, flushed.absent = (
                stats.listed,
                stats.foreign,
                stats.absent,
            )
            chunk.clear()

        listing = self._storage.list(list_prefix(cfg))
        async for item in select(
            listing,
            cfg.path_prefix,
            at_us=cfg.at_us,
            stats=stats,
            after=after,
            on_foreign=self._foreign,
        ):
            chunk.append(item)
            if len(chunk) >= CHUNK:
                await flush(done=False)
        await flush(done=True)
        self._log.info("restore.planned", resumed_after=after, **vars(stats))

    async def _run_legacy(self) -> None:
        cfg, state = self._cfg, self._state
        cursor, phase = await state.cursor()
        if phase == "group":
            listed = foreign = 0
            offers: list[tuple[str, int, int, str]] = []
            last = cursor
            async for info in self._storage.list(cfg.path_prefix):
                if cursor is not None and info.name <= cursor:
                    continue
                listed += 1
                last = info.name
                name = parse_legacy_name(info.name, cfg.path_prefix)
                if name is None:
                    foreign += 1
                    self._foreign(info.name)
                elif (rank := legacy_rank(name, cfg.at_us)) is not None:
                    offers.append((name.key_hash, rank, info.size, info.name))
                if listed >= CHUNK:
                    assert last is not None
                    await state.offer(offers, cursor=last, listed=listed, foreign=foreign)
                    listed = foreign = 0
                    offers.clear()
            if last is not None and listed:
                await state.offer(offers, cursor=last, listed=listed, foreign=foreign)
            await state.set_phase("feed")
        while True:
            await self._wait_for_room()
            taken = await state.take_legacy(CHUNK)
            await state.add_legacy(taken, per_entry=cfg.batch_size, done=not taken)
            if not taken:
                break
        self._log.info("restore.planned", format="legacy")

    async def _wait_for_room(self) -> None:
        state = self._state
        self._flushes += 1
        if self._flushes % _TRIM_EVERY == 0:
            await trim(state.r, state.keys.stream)
        while await state.backlog() >= self._cfg.max_backlog:
            await trim(state.r, state.keys.stream)
            await anyio.sleep(_BACKLOG_POLL)

    def _foreign(self, name: str) -> None:
        if self._foreign_shown < FOREIGN_SHOWN:
            self._foreign_shown += 1
            hint = (
                "objects of the original tool need --format legacy"
                if not self._cfg.legacy and parse_legacy_name(name, self._cfg.path_prefix)
                else None
            )
            self._log.warning("restore.foreign_object", object=name, hint=hint)


@dataclass
class Preview:
    """What ``--dry-run`` reports."""

    stats: PlanStats
    sample: list[str] = field(default_factory=list)
    segments: int = 0  # segment objects whose index was read
    damaged: int = 0  # segments whose index is damaged
    records: int = 0  # records in the segments' blocks that the plan reads
    ranges: int = 0  # key ranges the segments' records are planned in
    range_bytes: int = 0  # bytes the ranges fetch


async def preview(
    cfg: RestoreConfig, storage: Storage, *, sample: int = 10, on_foreign: Callable[[str], None]
) -> Preview:
    """The plan without Redis: counts, bytes and the first ``sample`` object names.

    For legacy objects the best object per key is kept in memory (about 100 bytes per key),
    since a legacy key's versions are spread over the whole listing.
    """
    stats = PlanStats()
    out = Preview(stats)
    if not cfg.legacy:
        footers = FooterStats()
        blocks = await read_footers(storage, cfg.path_prefix, stats=footers, at_us=cfg.at_us)
        ranges = plan_ranges(blocks, budget=cfg.range_bytes, at_us=cfg.at_us, db=cfg.db)
        out.segments, out.damaged = footers.segments, len(footers.damaged)
        out.records = sum(r.records for r in ranges)
        out.ranges = len(ranges)
        out.range_bytes = sum(r.size for r in ranges)
        out.sample += sorted({b.name for b in blocks})[:sample]
        async for item in select(
            storage.list(list_prefix(cfg)),
            cfg.path_prefix,
            at_us=cfg.at_us,
            stats=stats,
            on_foreign=on_foreign,
        ):
            if len(out.sample) < sample:
                out.sample.append(item.names[0])
        return out
    best: dict[bytes, tuple[int, int, str]] = {}
    async for info in storage.list(cfg.path_prefix):
        stats.listed += 1
        name = parse_legacy_name(info.name, cfg.path_prefix)
        if name is None:
            stats.foreign += 1
            on_foreign(info.name)
            continue
        rank = legacy_rank(name, cfg.at_us)
        if rank is None:
            continue
        h = bytes.fromhex(name.key_hash)
        if h not in best or best[h][0] < rank:
            best[h] = (rank, info.size, info.name)
    stats.keys = len(best)
    stats.bytes = sum(size for _, size, _ in best.values())
    out.sample = sorted(name for _, _, name in best.values())[:sample]
    return out
