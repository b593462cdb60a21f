"""Reading the segment layout by key range: the newest record per key, in bounded memory.

Every segment's records are sorted by ``(db, key)`` and cut into blocks, and its block index
says each block's first and last key (:mod:`rrb_streams.format.segment`). A reader therefore:

1. lists the segments and fetches each one's index: one ranged GET of its tail
   (:func:`read_footers`);
2. cuts the key space into :class:`Range` values, each naming the blocks that may hold its
   keys, so that each range decodes about ``budget`` bytes (:func:`plan_ranges`). A block
   spanning several ranges is named by each of them;
3. per range, fetches those blocks (ranged GETs), keeps the records inside the range, and
   per key the record with the highest ``(stamp, read_at_us)``, among those read at or before
   ``--at`` when one is given (:func:`read_range`).

A range holds every record any segment has for its keys, so its winners are final: ranges
can be restored or compared independently, by different processes, in any order.

**Damage.** A block whose checksum fails is reported with the key span and the newest stamp
its index gives. No key inside that span is decided from the other blocks unless its record
there is newer than that stamp: the damaged block might have held a newer record of it. The
caller counts those keys as failed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format import codec
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.large import LARGE_BLOCK, read_large_block
from rrb_streams.format.layout import latest_name
from rrb_streams.format.segment import (
    TAIL_READ,
    BlockInfo,
    Footer,
    NeedMore,
    decode_block,
    newer,
    read_footer,
)
from rrb_streams.format.view import read_view
from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.encrypted import require_opens

Key = tuple[int, bytes]  # (db, raw key): the order of records in segments

DEFAULT_BUDGET = 4 << 20  # bytes of records a range decodes, about: some 50,000 small ones
_FOOTER_READERS = 8  # segments whose index is fetched at once
_BLOCK_READERS = 4  # runs of blocks of one range fetched at once
# Stored bytes one ranged GET fetches at most: about a range's budget, so a range of a
# snapshot part is one GET (a GET per megabyte cost several requests per range), and no run
# holds much more than the range decodes anyway.
_RUN_BYTES = 4 << 20
_REPLANS = 3  # fresh plans of a range whose objects were compacted away while it was read
_DECODE_IN_THREAD = 256 << 10  # compressed bytes above which a block is decoded off the loop


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block of one segment object."""

    name: str
    info: BlockInfo


@dataclass(frozen=True, slots=True)
class Range:
    """Keys from ``lo`` (inclusive; ``None``: the first) to ``hi`` (exclusive; ``None``: past
    the last), and every block that may hold records of them."""

    lo: Key | None
    hi: Key | None
    blocks: tuple[BlockRef, ...]
    #: Records of the blocks first named by this range, for progress: over the ranges of one
    #: plan every record counts once, though a block reaching over several ranges is read by
    #: each of them.
    records: int = 0

    @property
    def size(self) -> int:
        """Compressed bytes its blocks fetch."""
        return sum(b.info.length for b in self.blocks)

    def holds(self, key: Key) -> bool:
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)

    def to_json(self) -> str:
        return json.dumps(
            {
                "lo": _key_out(self.lo),
                "hi": _key_out(self.hi),
                "b": [_block_out(b) for b in self.blocks],
                "n": self.records,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Range:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) on anything malformed."""
        raw = json.loads(text)
        try:
            blocks = tuple(_block_in(b) for b in raw["b"])
            return cls(_key_in(raw["lo"]), _key_in(raw["hi"]), blocks, int(raw.get("n", 0)))
        except IndexError as exc:
            raise ValueError(f"malformed key range: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Damage:
    """A block that failed its checks: no key in ``first``..``last`` is decided."""

    name: str
    block: int  # its offset in the object
    first: Key
    last: Key
    records: int
    reason: str
    max_stamp: int = 0  # the newest stamp the block held, from the index

    def covers(self, key: Key, stamp: int = 0) -> bool:
        """Whether the block may have held a record of ``key`` newer than one of ``stamp``."""
        return self.first <= key <= self.last and stamp <= self.max_stamp


@dataclass
class RangeRead:
    """What :func:`read_range` found: the winner per key, and the damage."""

    winners: dict[Key, tuple[KeyRecord, str]] = field(default_factory=dict)  # and its object
    damaged: list[Damage] = field(default_factory=list)
    undecided: list[Key] = field(default_factory=list)  # keys a damaged block may have held
    fetched: int = 0  # compressed bytes
    gone: bool = False  # an object was deleted since the plan: compaction replaced it

    def covering(self, key: Key, stamp: int = 0) -> Damage | None:
        """The damage that leaves ``key`` (newest known at ``stamp``) undecided, if any."""
        return next((d for d in self.damaged if d.covers(key, stamp)), None)


@dataclass
class FooterStats:
    vanished: int = 0  # objects deleted between the listing and their index read
    gone: list[str] = field(default_factory=list)  # their names
    segments: int = 0
    blocks: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (object, reason)


async def read_footer_of(storage: Storage, info: ObjectInfo) -> Footer:
    """The block index of one segment: a ranged GET of its tail, a second when the index is
    longer than :data:`TAIL_READ`. Raises ``CorruptObject`` or ``ObjectNotFound``.

    The index is checked against the size the tail read reports, not ``info.size``: for an
    encrypted object that is the plaintext's size, which no listing knows.
    """
    if info.size == 0:
        raise CorruptObject(f"{info.name}: empty, not a segment")
    want = TAIL_READ
    while True:
        tail, size = await storage.get_tail(info.name, want)
        try:
            return read_footer(tail, size, info.name)
        except NeedMore as more:
            if more.needed <= want or more.needed > size:
                raise CorruptObject(
                    f"{info.name}: the block index does not fit the object"
                ) from None
            want = more.needed
        except CorruptObject:
            # An age file read without an identity (a reader given one decrypts it below
            # this layer) makes no sense as a segment: worth one small read to say so.
            await require_opens(storage, info.name)
            raise


async def read_footers(
    storage: Storage, prefix: str, *, stats: FooterStats, at_us: int | None = None
) -> list[BlockRef]:
    """The blocks of every segment a reader for ``at_us`` needs under ``prefix``: those the
    manifest names for that moment plus level 0 (:func:`read_view`). A segment whose index is
    damaged is counted in ``stats.damaged`` and left out; when one was deleted since the view
    was taken, the view is taken again.

    Raises ``BeforeRetention`` for an ``at_us`` older than what retention kept.
    """
    for attempt in range(_REPLANS + 1):
        view = await read_view(storage, prefix, at_us=at_us)
        found = FooterStats()
        blocks = await footers_of(storage, view.objects, stats=found)
        if found.vanished and attempt < _REPLANS:
            # Deleted between the view and its index read: compaction merged it into objects
            # a newer manifest names. Look again rather than miss its records.
            continue
        break
    stats.segments += found.segments
    stats.blocks += found.blocks
    stats.damaged += found.damaged
    stats.vanished += found.vanished
    # Still gone after fresh looks: not compaction's doing. Its records are lost: say so.
    stats.damaged += [
        (name, f"{name}: named by the manifest, gone from storage") for name in found.gone
    ]
    return blocks


async def footers_of(
    storage: Storage, infos: Sequence[ObjectInfo], *, stats: FooterStats
) -> list[BlockRef]:
    """The blocks of the segments ``infos``, as :func:`read_footers` counts them."""
    blocks: list[BlockRef] = []
    limiter = anyio.CapacityLimiter(_FOOTER_READERS)

    async def one(info: ObjectInfo) -> None:
        async with limiter:
            try:
                footer = await read_footer_of(storage, info)
            except ObjectNotFound:
                stats.vanished += 1  # compacted away since the listing
                stats.gone.append(info.name)
                return
            except CorruptObject as exc:
                stats.damaged.append((info.name, str(exc)))
                return
        stats.segments += 1
        stats.blocks += len(footer.blocks)
        blocks.extend(BlockRef(info.name, b) for b in footer.blocks)

    async with anyio.create_task_group() as tg:
        for info in infos:
            tg.start_soon(one, info)
    return blocks


def plan_ranges(
    blocks: Sequence[BlockRef],
    *,
    budget: int = DEFAULT_BUDGET,
    at_us: int | None = None,
    db: int | None = None,
) -> list[Range]:
    """Cut the key space into ranges whose blocks that start in them hold about ``budget``
    bytes of records, as decoded, whatever the compression achieved. A reader of a range also
    decodes the blocks carried over from the previous range: one per segment overlapping the
    cut at most, which compaction keeps few.

    Blocks whose records were all read after ``at_us``, or that hold no key of ``db``, are
    left out. A range ends where the next block starts; blocks reaching past the end carry
    over into the next range as well, so every range names every block that may hold its keys.
    """
    chosen = [
        b
        for b in blocks
        if (at_us is None or b.info.min_read_at_us <= at_us)
        and (db is None or b.info.first[0] <= db <= b.info.last[0])
    ]
    chosen.sort(key=lambda b: (b.info.first, b.name, b.info.offset))
    out: list[Range] = []
    lo: Key | None = None if db is None else (db, b"")
    carried: list[BlockRef] = []
    i = 0
    while i < len(chosen) or carried:
        members = list(carried)
        # Only blocks that start here count: with many overlapping segments the blocks carried
        # over from the last range alone may exceed the budget, and counting them would cut a
        # range per block, each reading every overlapping block again.
        size = 0
        while i < len(chosen) and size < budget:
            members.append(chosen[i])
            size += chosen[i].info.raw_length
            i += 1
        # Blocks starting at the same key cannot be split between ranges, and a range ends
        # after its start (with ``db``, the first blocks may start in an earlier db).
        while i < len(chosen) and (
            chosen[i].info.first == members[-1].info.first
            or (lo is not None and chosen[i].info.first <= lo)
        ):
            members.append(chosen[i])
            i += 1
        hi: Key | None = chosen[i].info.first if i < len(chosen) else None
        if db is not None and (hi is None or hi > (db + 1, b"")):
            hi = (db + 1, b"")
        fresh = sum(b.info.count for b in members[len(carried) :])
        out.append(Range(lo, hi, tuple(members), fresh))
        carried = [b for b in members if hi is not None and b.info.last >= hi]
        if hi is None or (db is not None and hi >= (db + 1, b"")):
            break
        lo = hi
    return out


async def read_range(storage: Storage, rng: Range, *, at_us: int | None = None) -> RangeRead:
    """The newest record per key of ``rng`` (at or before ``at_us``), from its blocks.

    Each block is merged into the winners as soon as it is decoded, so a range holds its
    winners and the few blocks in flight, not every record of every block it names (blocks
    carried over from the previous range hold mostly keys outside this one).
    """
    out = RangeRead()
    limiter = anyio.CapacityLimiter(_BLOCK_READERS)
    winners = out.winners
    lo, hi = rng.lo, rng.hi

    def merge(name: str, records: list[KeyRecord], info: BlockInfo | None = None) -> None:
        # A block wholly inside the range, read with no --at (a snapshot's, mostly) needs no
        # test per record but the winner's: this loop runs once per record of a restore.
        inside = (
            info is not None
            and at_us is None
            and (lo is None or info.first >= lo)
            and (hi is None or info.last < hi)
        )
        get = winners.get
        for rec in records:
            key = (rec.db, rec.key)
            if not inside:
                if (lo is not None and key < lo) or (hi is not None and key >= hi):
                    continue
                if at_us is not None and rec.read_at_us > at_us:
                    continue
            best = get(key)
            if best is None or newer(rec, best[0]):
                winners[key] = (rec, name)

    async def one(run: list[BlockRef]) -> None:
        async with limiter:
            await read(run)

    async def read(run: list[BlockRef]) -> None:
        name, start = run[0].name, run[0].info.offset
        if len(run) == 1 and run[0].info.raw_length >= LARGE_BLOCK:
            await large(run[0])
            return
        try:
            data = await storage.get_range(name, start, _run_end(run) - start)
        except ObjectNotFound as exc:
            out.damaged += [_damage(ref, f"{name}: gone from storage ({exc})") for ref in run]
            out.gone = True
            return
        except CorruptObject as exc:
            # Storage itself found damage (an encrypted chunk that fails authentication):
            # fetch the blocks one by one, so only those the damage covers are lost.
            if len(run) == 1:
                out.damaged.append(_damage(run[0], str(exc)))
                return
            for ref in run:
                await read([ref])
            return
        out.fetched += len(data)
        for ref in run:
            info = ref.info
            # Cut short when the object is: the block then fails its checksum.
            block = data[info.offset - start : info.offset - start + info.length]
            try:
                if len(block) > _DECODE_IN_THREAD:
                    records = await anyio.to_thread.run_sync(decode_block, block, info, name)
                else:
                    records = decode_block(block, info, name)
            except CorruptObject as exc:
                out.damaged.append(_damage(ref, str(exc)))
                continue
            merge(name, records, info)

    async def large(ref: BlockRef) -> None:
        # One large value: fetched in pieces, never held compressed and raw at once.
        try:
            records = await read_large_block(storage, ref.name, ref.info)
        except ObjectNotFound as exc:
            out.damaged.append(_damage(ref, f"{ref.name}: gone from storage ({exc})"))
            out.gone = True
            return
        except CorruptObject as exc:
            out.damaged.append(_damage(ref, str(exc)))
            return
        out.fetched += ref.info.length
        merge(ref.name, records)

    async with anyio.create_task_group() as tg:
        for run in _runs(rng.blocks):
            tg.start_soon(one, run)
    if out.damaged:
        # A record newer than everything a damaged block held still wins: after a repair
        # wrote the key again, for one.
        out.undecided = [k for k, (r, _) in winners.items() if out.covering(k, r.stamp)]
        for key in out.undecided:
            del winners[key]
    return out


async def read_range_fresh(
    storage: Storage, prefix: str, rng: Range, *, at_us: int | None = None
) -> RangeRead:
    """:func:`read_range`, planned again from a fresh view when an object of the plan was
    deleted meanwhile. Compaction deletes an object only after its records are in objects
    the newest manifest names, so the fresh plan finds them; only an object that stays gone
    after :data:`_REPLANS` fresh plans is reported as damage."""
    read = await read_range(storage, rng, at_us=at_us)
    for _ in range(_REPLANS):
        if not read.gone:
            break
        blocks = await read_footers(storage, prefix, stats=FooterStats(), at_us=at_us)
        lo, hi = rng.lo, rng.hi
        mine = tuple(
            b
            for b in blocks
            if (lo is None or b.info.last >= lo) and (hi is None or b.info.first < hi)
        )
        read = await read_range(storage, replace(rng, blocks=mine), at_us=at_us)
    return read


class SegmentIndex:
    """The block indexes of a prefix's segments, kept between looks: segments never change
    once written, so a fresh look fetches only the indexes of segments new since the last.

    For checks of a few keys at a time (``rrb-verify``'s re-checks), not for whole restores.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self._storage = storage
        self._prefix = prefix
        self._footers: dict[str, Footer] = {}

    async def refresh(self) -> None:
        """List the segments again; fetch the indexes of new ones, forget deleted ones."""
        view = await read_view(self._storage, self._prefix)
        names = {info.name: info for info in view.objects}
        for name in [n for n in self._footers if n not in names]:
            del self._footers[name]
        for name, info in names.items():
            if name not in self._footers:
                try:
                    self._footers[name] = await read_footer_of(self._storage, info)
                except (ObjectNotFound, CorruptObject):
                    continue  # gone again, or damaged: a whole read reports it

    async def lookup(self, keys: Sequence[Key]) -> RangeRead:
        """The newest record of each key that the segments hold (as of the last refresh)."""
        out = RangeRead()
        for key in keys:
            blocks = tuple(
                BlockRef(name, b)
                for name, footer in self._footers.items()
                for b in footer.blocks
                if b.first <= key <= b.last
            )
            if not blocks:
                continue
            rng = Range(key, (key[0], key[1] + b"\x00"), blocks)
            one = await read_range_fresh(self._storage, self._prefix, rng)
            out.winners.update(one.winners)
            out.damaged += one.damaged
            out.undecided += one.undecided
            out.fetched += one.fetched
        return out


async def prefer_keys_layout(
    storage: Storage,
    prefix: str,
    winners: dict[Key, tuple[KeyRecord, str]],
    *,
    at_us: int | None = None,
    on_damaged: Callable[[str, str], None] | None = None,
) -> None:
    """Where the prefix also holds the keys layout (its uploaders changed layout), let each
    key's latest-state object there replace its segment winner when it was read later, by
    the source's clock: the two layouts share no stamps. ``on_damaged(name, reason)`` hears
    of keys-layout objects that fail their checksum; they are passed over."""
    keys = list(winners)
    names = [latest_name(prefix, db, key) for db, key in keys]
    for key, name, data in zip(keys, names, await storage.get_many(names), strict=True):
        if isinstance(data, ObjectNotFound):
            continue
        try:
            if isinstance(data, CorruptObject):
                raise data
            rec = codec.decode(data, name)
        except CorruptObject as exc:
            if on_damaged is not None:
                on_damaged(name, str(exc))
            continue
        if rec.read_at_us > winners[key][0].read_at_us and (
            at_us is None or rec.read_at_us <= at_us
        ):
            winners[key] = (rec, name)


def range_key_out(key: Key | None) -> str:
    """A range bound as text (JSON), for a plan's cursor."""
    return json.dumps(_key_out(key))


def range_key_in(text: str) -> Key | None:
    """The inverse of :func:`range_key_out`. Raises ``ValueError`` on malformed text."""
    try:
        return _key_in(json.loads(text))
    except (TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed range cursor {text!r}") from exc


def _runs(blocks: Sequence[BlockRef]) -> list[list[BlockRef]]:
    """``blocks`` grouped into runs that follow each other in one object, each fetched with
    one ranged GET (up to :data:`_RUN_BYTES`): a range names many neighbouring blocks of a
    large segment, and a GET per block would cost a request each."""
    runs: list[list[BlockRef]] = []
    for ref in sorted(blocks, key=lambda b: (b.name, b.info.offset)):
        last = runs[-1] if runs else None
        if (
            last is not None
            and last[-1].name == ref.name
            and _run_end(last) == ref.info.offset
            and _run_end(last) - last[0].info.offset + ref.info.length <= _RUN_BYTES
        ):
            last.append(ref)
        else:
            runs.append([ref])
    return runs


def _run_end(run: list[BlockRef]) -> int:
    return run[-1].info.offset + run[-1].info.length


def _damage(ref: BlockRef, reason: str) -> Damage:
    i = ref.info
    return Damage(ref.name, i.offset, i.first, i.last, i.count, reason, i.max_stamp)


def _key_out(key: Key | None) -> Any:
    return None if key is None else [key[0], base64.b64encode(key[1]).decode()]


def _key_in(raw: Any) -> Key | None:
    return None if raw is None else (int(raw[0]), base64.b64decode(raw[1], validate=True))


def _block_out(ref: BlockRef) -> list[Any]:
    i = ref.info
    return [
        ref.name,
        i.offset,
        i.length,
        i.raw_length,
        i.count,
        _key_out(i.first),
        _key_out(i.last),
        i.min_read_at_us,
        i.max_read_at_us,
        i.min_stamp,
        i.max_stamp,
        i.checksum.hex(),
    ]


def _block_in(raw: list[Any]) -> BlockRef:
    first, last = _key_in(raw[5]), _key_in(raw[6])
    if first is None or last is None:
        raise ValueError("a block without its first and last key")
    info = BlockInfo(
        offset=int(raw[1]),
        length=int(raw[2]),
        raw_length=int(raw[3]),
        count=int(raw[4]),
        first=first,
        last=last,
        min_read_at_us=int(raw[7]),
        max_read_at_us=int(raw[8]),
        min_stamp=int(raw[9]),
        max_stamp=int(raw[10]),
        checksum=bytes.fromhex(raw[11]),
    )
    return BlockRef(str(raw[0]), info)
