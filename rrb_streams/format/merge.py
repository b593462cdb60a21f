"""The streaming k-way merge of segments: what compaction is made of.

Every segment's records are sorted by ``(db, key, stamp, read_at_us)``, so a merge of any
number of them reads each one front to back, one ranged GET of up to :data:`RUN_BYTES` at a
time, and writes its output as it goes (:class:`~rrb_streams.format.builder.SegmentBuilder`),
cutting a new output object every ``part_bytes`` at a key boundary. Memory holds one run and
one decoded block per input plus one output part, whatever the dataset's size.

The merge runs in a worker thread: decoding, sorting and compressing are CPU work that would
stall the event loop; it calls back into the loop for each storage request.

A ``policy`` chooses what survives, one key at a time (:func:`keep_all`,
:func:`keep_newest`). A block that fails its checks stops the merge with
:class:`DamagedInput` naming the object: a merge that went on without it would write outputs
that silently lack whatever the block held.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.from_thread
import anyio.to_thread

from rrb_streams.errors import CorruptObject, ObjectNotFound, RrbError
from rrb_streams.format.builder import SegmentBuilder
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.large import LARGE_BLOCK, read_large_block
from rrb_streams.format.segment import BlockInfo, Footer, decode_block, new_uid, segment_name
from rrb_streams.storage.base import Storage

RUN_BYTES = 1 << 20  # compressed bytes one GET of an input fetches at most
PART_BYTES = 32 << 20  # an output object closes at the first key boundary past this size
PROGRESS_EVERY = 10.0  # seconds between progress reports of a long merge

Policy = Callable[[list[KeyRecord]], Iterable[KeyRecord]]  # one key's records, oldest first
_ORDER = operator.attrgetter("db", "key", "stamp", "read_at_us")


class DamagedInput(RrbError):
    """An input of a merge failed its checks, or vanished. ``name`` says which."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


@dataclass(frozen=True, slots=True)
class Output:
    """One object a merge wrote."""

    name: str
    size: int
    records: int
    min_stamp: int
    max_stamp: int
    min_read_us: int
    max_read_us: int
    part: int  # its place among the merge's outputs, which follow each other in key order


@dataclass
class MergeStats:
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0  # compressed bytes read
    bytes_out: int = 0
    outputs: list[Output] = field(default_factory=list)
    max_read_us: int = 0  # over every record read, kept or not


def keep_all(records: list[KeyRecord]) -> Iterable[KeyRecord]:
    """History: every read survives, exact repeats (one segment merged twice) once."""
    last: tuple[int, int] | None = None
    for rec in records:
        if (rec.stamp, rec.read_at_us) != last:
            last = (rec.stamp, rec.read_at_us)
            yield rec


def keep_newest(drop_before_us: int) -> Policy:
    """Snapshot: the newest read of each key only. A key whose newest read found it gone, or
    whose expiry had passed, disappears once that read (or expiry) is older than
    ``drop_before_us``: no restore inside the retention window would write it."""

    def policy(records: list[KeyRecord]) -> Iterable[KeyRecord]:
        best = records[-1]  # inputs are in (stamp, read_at_us) order within a key
        if best.tombstone and best.read_at_us < drop_before_us:
            return ()
        if best.expire_at_ms is not None and best.expire_at_ms * 1000 < drop_before_us:
            return ()
        return (best,)

    return policy


def _runs(blocks: Sequence[BlockInfo]) -> Iterator[list[BlockInfo]]:
    """Consecutive blocks fetched together, up to :data:`RUN_BYTES` (a large block alone)."""
    run: list[BlockInfo] = []
    for info in blocks:
        if run and (
            sum(b.length for b in run) + info.length > RUN_BYTES
            or info.raw_length >= LARGE_BLOCK
            or run[-1].raw_length >= LARGE_BLOCK
        ):
            yield run
            run = []
        run.append(info)
    if run:
        yield run


def _chain(
    storage: Storage, chain: Sequence[tuple[str, Footer]], stats: MergeStats
) -> Iterator[KeyRecord]:
    """One input's records in order: the objects of a chain hold disjoint key ranges, in
    order (a snapshot's parts), so they read as one."""
    for name, footer in chain:
        yield from _records(storage, name, footer, stats)


def _records(storage: Storage, name: str, footer: Footer, stats: MergeStats) -> Iterator[KeyRecord]:
    """One object's records in order; runs in the merge's worker thread."""
    for run in _runs(footer.blocks):
        anyio.from_thread.check_cancelled()
        start = run[0].offset
        try:
            if len(run) == 1 and run[0].raw_length >= LARGE_BLOCK:
                stats.bytes_in += run[0].length
                records = anyio.from_thread.run(read_large_block, storage, name, run[0])
                stats.records_in += len(records)
                yield from records
                continue
            end = run[-1].offset + run[-1].length
            data = anyio.from_thread.run(storage.get_range, name, start, end - start)
        except ObjectNotFound as exc:
            raise DamagedInput(name, f"{name}: gone from storage ({exc})") from exc
        except CorruptObject as exc:
            raise DamagedInput(name, str(exc)) from exc
        stats.bytes_in += len(data)
        for info in run:
            block = data[info.offset - start : info.offset - start + info.length]
            try:
                records = decode_block(block, info, name)
            except CorruptObject as exc:
                raise DamagedInput(name, str(exc)) from exc
            stats.records_in += len(records)
            yield from records


def _merge(
    storage: Storage,
    inputs: Sequence[Sequence[tuple[str, Footer]]],
    policy: Policy,
    prefix: str,
    level: int,
    part_bytes: int,
    written: list[str],
    on_progress: Callable[[MergeStats], None] | None,
) -> MergeStats:
    stats = MergeStats()
    streams = [_chain(storage, chain, stats) for chain in inputs]
    merged = heapq.merge(*streams, key=_ORDER)
    builder: SegmentBuilder | None = None

    def close() -> None:
        nonlocal builder
        if builder is None:
            return
        builder.close_block()
        blocks, records = builder.blocks, builder.records
        pieces = builder.finish_pieces()
        size = sum(map(len, pieces))
        builder = None
        name = segment_name(
            prefix,
            level,
            min(b.min_stamp for b in blocks),
            max(b.max_stamp for b in blocks),
            new_uid(),
        )
        written.append(name)
        # Streamed from its pieces: joining them would hold the part twice.
        anyio.from_thread.run(storage.put_stream, name, pieces)
        del pieces
        stats.bytes_out += size
        stats.outputs.append(
            Output(
                name,
                size,
                records,
                min(b.min_stamp for b in blocks),
                max(b.max_stamp for b in blocks),
                min(b.min_read_at_us for b in blocks),
                max(b.max_read_at_us for b in blocks),
                len(stats.outputs),
            )
        )

    next_report = time.monotonic() + PROGRESS_EVERY
    for i, (_, group) in enumerate(itertools.groupby(merged, key=operator.attrgetter("db", "key"))):
        if on_progress is not None and i % 4096 == 0 and time.monotonic() >= next_report:
            on_progress(stats)
            next_report = time.monotonic() + PROGRESS_EVERY
        records = list(group)
        for rec in records:
            if rec.read_at_us > stats.max_read_us:
                stats.max_read_us = rec.read_at_us
        for rec in policy(records):
            if builder is None:
                builder = SegmentBuilder()
            builder.add(rec)
            stats.records_out += 1
        if builder is not None and builder.size >= part_bytes:
            close()  # only between keys: a key's records stay in one part
    close()
    anyio.from_thread.run(storage.flush)
    return stats


async def merge(
    storage: Storage,
    inputs: Sequence[Sequence[tuple[str, Footer]]],
    *,
    policy: Policy = keep_all,
    prefix: str,
    level: int,
    part_bytes: int = PART_BYTES,
    written: list[str] | None = None,
    on_progress: Callable[[MergeStats], None] | None = None,
) -> MergeStats:
    """Merge the segments ``inputs`` (chains of objects, each a name and its verified footer,
    whose objects follow each other in key order) into new segments of
    ``level``, durable when this returns. Their names are fresh: nothing refers to them until
    a manifest does.

    Raises :class:`DamagedInput` for a damaged or vanished input, and storage errors. On any
    error, outputs already written stay behind, unreferenced: ``written`` names every output
    as its write starts, so the caller can delete them. ``on_progress`` hears the counts
    about every :data:`PROGRESS_EVERY` seconds, from the merge's thread.
    """
    run = functools.partial(
        _merge,
        storage,
        inputs,
        policy,
        prefix,
        level,
        part_bytes,
        [] if written is None else written,
        on_progress,
    )
    return await anyio.to_thread.run_sync(run)
