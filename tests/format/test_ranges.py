"""Reading segments by key range: listing, footers, planning, reading, damage, the JSON of a
range, the key index for re-checks, and the keys layout's say over segment winners.

Most tests build a random backup of a few segments (several dbs, binary keys, several records
per key spread over segments, tombstones, some stamps 0) and check the module against a brute
force reading of the records that went in.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format import codec
from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.layout import latest_name
from rrb_streams.format.ranges import (
    BlockRef,
    Damage,
    FooterStats,
    Key,
    Range,
    RangeRead,
    SegmentIndex,
    plan_ranges,
    prefer_keys_layout,
    range_key_in,
    range_key_out,
    read_footer_of,
    read_footers,
    read_range,
)
from rrb_streams.format.segment import (
    TAIL_READ,
    TRAILER_SIZE,
    BlockInfo,
    decode_segment,
    read_footer,
    segment_name,
)
from rrb_streams.format.view import list_segments
from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.fs import FsStorage
from rrb_streams.storage.memory import MemoryStorage

PREFIX = "bk/"
DBS = (0, 1, 2)
# (block_records, share of the keys the segment holds): many narrow blocks, one block per
# record, one wide block over every db, medium blocks, another wide one, odd-sized blocks.
SEGMENTS = ((5, 0.6), (1, 0.3), (500, 0.5), (20, 0.7), (500, 0.4), (9, 0.5))
HUGE = 1 << 60
# Bytes of keys: the ends of the byte range and the neighbours of printable ones.
ALPHABET = bytes((0x00, 0x01, 0x61, 0x62, 0x7F, 0x80, 0xFE, 0xFF))


# --- a backup to read ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """One record as it went in, and where it ended up."""

    rec: KeyRecord
    name: str  # its segment
    block: int  # the offset of its block in the segment

    @property
    def key(self) -> Key:
        return (self.rec.db, self.rec.key)


@dataclass
class Backup:
    storage: Storage
    names: list[str] = field(default_factory=list)  # the segments, in writing order
    records: list[Stored] = field(default_factory=list)
    blocks: dict[str, tuple[BlockInfo, ...]] = field(default_factory=dict)  # per segment

    def refs(self) -> set[tuple[str, int]]:
        return {(name, b.offset) for name, blocks in self.blocks.items() for b in blocks}

    def block(self, name: str, offset: int) -> BlockInfo:
        return next(b for b in self.blocks[name] if b.offset == offset)

    def in_block(self, name: str, offset: int) -> list[Stored]:
        return [s for s in self.records if s.name == name and s.block == offset]


def make_record(
    db: int, key: bytes, *, stamp: int, read_at_us: int, tombstone: bool = False
) -> KeyRecord:
    if tombstone:
        return KeyRecord(key, db, "none", None, read_at_us, "1-0", "7.2.4", b"", True, stamp)
    payload = b"\x00dump:" + key + stamp.to_bytes(8, "big")
    return KeyRecord(key, db, "string", None, read_at_us, "1-0", "7.2.4", payload, False, stamp)


def random_keys(rng: random.Random, db: int, n: int) -> list[Key]:
    keys = {b"", b"\x00", b"\xff", b"\x00\x00", b"\xff\xff"} if db == 1 else set()
    while len(keys) < n:
        keys.add(bytes(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 5))))
    return [(db, k) for k in sorted(keys)]


def random_segments(seed: int, keys_per_db: int = 30) -> list[tuple[int, list[KeyRecord]]]:
    """(block_records, records) per segment. Every record of every key has its own stamp and
    read time (so exactly one is the newest); the read times do not follow the stamps."""
    rng = random.Random(seed)
    keys = [k for db in DBS for k in random_keys(rng, db, keys_per_db)]
    shapes: list[tuple[int, list[Key]]] = []
    for block_records, share in SEGMENTS:
        chosen = [k for k in keys if rng.random() < share]
        shapes.append((block_records, [k for k in chosen for _ in range(rng.randrange(1, 4))]))
    total = sum(len(ks) for _, ks in shapes)
    stamps = iter(rng.sample(range(1, 10**9), total))
    reads = iter(rng.sample(range(10**15, 10**15 + 10**7), total))
    out: list[tuple[int, list[KeyRecord]]] = []
    for block_records, ks in shapes:
        records = [
            make_record(
                db,
                key,
                stamp=0 if rng.random() < 0.1 else next(stamps),  # format-1 records: no stamp
                read_at_us=next(reads),
                tombstone=rng.random() < 0.15,
            )
            for db, key in ks
        ]
        out.append((block_records, records))
    return out


async def store_segment(
    backup: Backup, records: Sequence[KeyRecord], *, block_records: int, uid: int
) -> str:
    """Encode, store and remember one segment; its name."""
    data = encode_segment(records, block_records=block_records)
    stamps = [r.stamp for r in records]
    name = segment_name(PREFIX, uid % 3, min(stamps), max(stamps), f"{uid:016x}")
    await backup.storage.put(name, data)
    footer, blocks = decode_segment(data, name)
    backup.names.append(name)
    backup.blocks[name] = footer.blocks
    for info, recs in zip(footer.blocks, blocks, strict=True):
        assert isinstance(recs, list)
        backup.records += [Stored(r, name, info.offset) for r in recs]
    return name


async def build(storage: Storage, seed: int = 1, keys_per_db: int = 30) -> Backup:
    backup = Backup(storage)
    for uid, (block_records, records) in enumerate(random_segments(seed, keys_per_db)):
        await store_segment(backup, records, block_records=block_records, uid=uid)
    return backup


def brute(
    records: Sequence[Stored],
    *,
    at_us: int | None = None,
    db: int | None = None,
    skip: Callable[[Stored], bool] = lambda s: False,
) -> dict[Key, tuple[KeyRecord, str]]:
    """The newest record per key by (stamp, read_at_us), read at or before ``at_us``."""
    out: dict[Key, Stored] = {}
    for s in records:
        if (at_us is not None and s.rec.read_at_us > at_us) or (db is not None and s.rec.db != db):
            continue
        if skip(s):
            continue
        best = out.get(s.key)
        if best is None or (s.rec.stamp, s.rec.read_at_us) > (best.rec.stamp, best.rec.read_at_us):
            out[s.key] = s
    return {k: (s.rec, s.name) for k, s in out.items()}


def median_read(backup: Backup) -> int:
    reads = sorted(s.rec.read_at_us for s in backup.records)
    return reads[len(reads) // 2]


async def planned(
    backup: Backup,
    *,
    budget: int = HUGE,
    at_us: int | None = None,
    db: int | None = None,
) -> list[Range]:
    stats = FooterStats()
    blocks = await read_footers(backup.storage, PREFIX, stats=stats)
    assert stats.damaged == []
    return plan_ranges(blocks, budget=budget, at_us=at_us, db=db)


async def read_all(
    storage: Storage, ranges: Sequence[Range], *, at_us: int | None = None
) -> tuple[dict[Key, tuple[KeyRecord, str]], list[RangeRead]]:
    """The winners of every range, each key from exactly one range, and each range's read."""
    winners: dict[Key, tuple[KeyRecord, str]] = {}
    reads: list[RangeRead] = []
    for rng in ranges:
        got = await read_range(storage, rng, at_us=at_us)
        for key in got.winners:
            assert rng.holds(key), (key, rng.lo, rng.hi)
            assert key not in winners, f"{key} won in two ranges"
        winners.update(got.winners)
        reads.append(got)
    return winners, reads


def check_plan(
    backup: Backup,
    ranges: Sequence[Range],
    *,
    budget: int,
    at_us: int | None = None,
    db: int | None = None,
) -> None:
    """Everything plan_ranges promises of these blocks."""
    expected = {
        (name, b.offset)
        for name, blocks in backup.blocks.items()
        for b in blocks
        if (at_us is None or b.min_read_at_us <= at_us)
        and (db is None or b.first[0] <= db <= b.last[0])
    }
    named = {(b.name, b.info.offset) for r in ranges for b in r.blocks}
    assert named == expected
    if not expected:
        assert ranges == []
        return
    # Contiguous and ordered, from the start of the key space (or the db) to its end.
    assert ranges[0].lo == (None if db is None else (db, b""))
    assert ranges[-1].hi == (None if db is None else (db + 1, b""))
    for before, after in itertools.pairwise(ranges):
        assert before.hi is not None and before.hi == after.lo
    for r in ranges:
        assert r.lo is None or r.hi is None or r.lo < r.hi
        ids = [(b.name, b.info.offset) for b in r.blocks]
        assert len(ids) == len(set(ids)), "a block named twice by one range"
        for ref in r.blocks:  # every block it names may hold some of its keys
            assert r.hi is None or ref.info.first < r.hi
            assert r.lo is None or ref.info.last >= r.lo
        assert r.size == sum(b.info.length for b in r.blocks)
    # Progress counts each record once: in the first range that names its block.
    counts = {(n, b.offset): b.count for n, bl in backup.blocks.items() for b in bl}
    assert sum(r.records for r in ranges) == sum(counts[x] for x in named)
    # All ranges but the last take blocks of their own (not carried over) until those hold
    # the budget in decoded bytes: they stop taking blocks only then.
    before: set[tuple[str, int]] = set()
    for r in ranges:
        ids = {(b.name, b.info.offset) for b in r.blocks}
        fresh = [b for b in r.blocks if (b.name, b.info.offset) not in before]
        assert r.records == sum(b.info.count for b in fresh)
        if r is not ranges[-1]:
            assert sum(b.info.raw_length for b in fresh) >= budget
        before = ids
    # Every record that counts is in a block its key's one range names.
    for s in backup.records:
        if (at_us is not None and s.rec.read_at_us > at_us) or (db is not None and s.rec.db != db):
            continue
        holding = [r for r in ranges if r.holds(s.key)]
        assert len(holding) == 1, s.key
        assert (s.name, s.block) in {(b.name, b.info.offset) for b in holding[0].blocks}


class CountingStorage(MemoryStorage):
    """Memory storage that counts ranged reads, and can lose an object at its first one."""

    def __init__(self) -> None:
        super().__init__()
        self.ranged: list[tuple[str, int, int]] = []
        self.vanish: set[str] = set()

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        self.ranged.append((name, start, length))
        if name in self.vanish:
            await self.delete(name)
        return await super().get_range(name, start, length)

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        self.ranged.append((name, -length, length))
        if name in self.vanish:
            await self.delete(name)
        return await super().get_tail(name, length)


async def rewrite(storage: Storage, name: str, change: Callable[[bytes], bytes]) -> None:
    await storage.put(name, change(await storage.get(name)))


def flip(at: int) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        out = bytearray(data)
        out[at] ^= 0x5A
        return bytes(out)

    return change


@asynccontextmanager
async def backend(kind: str, tmp_path: Path) -> AsyncIterator[Storage]:
    storage: Storage = MemoryStorage() if kind == "memory" else FsStorage(tmp_path / "store")
    try:
        yield storage
    finally:
        await storage.close()


# --- listing and footers -------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_segments_yields_only_segments_under_the_prefix_in_name_order() -> None:
    storage = MemoryStorage()
    backup = await build(storage)
    rec = make_record(0, b"k", stamp=1, read_at_us=1)
    await storage.put(latest_name(PREFIX, 0, b"k"), codec.encode(rec))  # keys layout
    await storage.put(f"{PREFIX}segments/notes.txt", b"x")
    await storage.put(f"{PREFIX}segments/0/0-0-0.seg", b"x")
    other = segment_name("other/", 0, 1, 1, "00000000000000aa")
    await storage.put(other, encode_segment([rec]))
    nested = segment_name(f"{PREFIX}sub/", 0, 1, 1, "00000000000000bb")
    await storage.put(nested, encode_segment([rec]))

    listed = [info async for info in list_segments(storage, PREFIX)]
    assert [i.name for i in listed] == sorted(backup.names)
    assert all(i.size == len(storage.objects[i.name]) for i in listed)
    assert [i.name async for i in list_segments(storage, "other/")] == [other]
    assert [i.name async for i in list_segments(storage, "nothing/")] == []


@pytest.mark.anyio
async def test_read_footers_gives_every_block_of_every_segment() -> None:
    backup = await build(MemoryStorage())
    stats = FooterStats()
    blocks = await read_footers(backup.storage, PREFIX, stats=stats)
    assert stats.segments == len(backup.names)
    assert stats.blocks == len(blocks) == sum(len(b) for b in backup.blocks.values())
    assert stats.damaged == []
    assert {(b.name, b.info) for b in blocks} == {
        (name, info) for name, infos in backup.blocks.items() for info in infos
    }
    # Some segments have many narrow blocks, some a single block spanning every db.
    assert max(len(b) for b in backup.blocks.values()) >= 20
    assert any(
        len(b) == 1 and b[0].first[0] == 0 and b[0].last[0] == 2 for b in backup.blocks.values()
    )


@pytest.mark.anyio
async def test_read_footers_of_nothing() -> None:
    stats = FooterStats()
    assert await read_footers(MemoryStorage(), PREFIX, stats=stats) == []
    assert stats == FooterStats()
    assert plan_ranges([]) == []
    assert plan_ranges([], db=1) == []


@pytest.mark.anyio
async def test_read_footer_of_a_small_segment_is_one_ranged_read() -> None:
    storage = CountingStorage()
    backup = await build(storage)
    name = backup.names[0]
    footer = await read_footer_of(storage, ObjectInfo(name, len(storage.objects[name])))
    assert footer.blocks == backup.blocks[name]
    assert len(storage.objects[name]) < TAIL_READ
    assert storage.ranged == [(name, -TAIL_READ, TAIL_READ)]


@pytest.mark.anyio
async def test_read_footer_of_an_index_longer_than_the_tail_read() -> None:
    storage = CountingStorage()
    records = [
        make_record(i % 3, b"key-%06d-" % i + b"\xff" * 20, stamp=i + 1, read_at_us=10**15 + i)
        for i in range(1200)
    ]
    data = encode_segment(records, block_records=1)
    name = segment_name(PREFIX, 0, 1, 1200, "0123456789abcdef")
    await storage.put(name, data)
    full = read_footer(data, len(data), name)
    assert len(full.blocks) == 1200
    assert len(data) - full.index_offset > TAIL_READ  # the case under test

    footer = await read_footer_of(storage, ObjectInfo(name, len(data)))
    assert footer == full
    assert storage.ranged == [
        (name, -TAIL_READ, TAIL_READ),
        (name, -(len(data) - full.index_offset), len(data) - full.index_offset),
    ]

    # And it plans and reads like any other.
    stats = FooterStats()
    ranges = plan_ranges(await read_footers(storage, PREFIX, stats=stats), budget=4096)
    assert stats.blocks == 1200
    winners, _ = await read_all(storage, ranges)
    assert {k: r for k, (r, _) in winners.items()} == {(r.db, r.key): r for r in records}


@pytest.mark.anyio
async def test_read_footer_of_a_missing_segment_raises_not_found() -> None:
    with pytest.raises(ObjectNotFound):
        await read_footer_of(MemoryStorage(), ObjectInfo(f"{PREFIX}segments/0/x.seg", 500))


def _break_trailer_magic(data: bytes) -> bytes:
    return data[:-1] + b"X"


def _break_index(data: bytes) -> bytes:
    index_offset = struct.unpack_from(">Q", data, len(data) - TRAILER_SIZE)[0]
    return flip(index_offset + 10)(data)


def _break_index_offset(data: bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(">Q", out, len(data) - TRAILER_SIZE, 3)
    return bytes(out)


def _huge_index_length(data: bytes) -> bytes:
    # An index said to start before the object: the tail can never reach it.
    out = bytearray(data)
    struct.pack_into(">QI", out, len(data) - TRAILER_SIZE, 16, len(data) - 16 - TRAILER_SIZE + 1)
    return bytes(out)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "damage",
    [
        _break_trailer_magic,
        _break_index,
        _break_index_offset,
        _huge_index_length,
        lambda data: data[:60],  # shorter than the smallest segment
        lambda data: data[:-1],  # the trailer moved
        lambda data: b"",
    ],
    ids=[
        "trailer-magic",
        "index-bytes",
        "index-offset",
        "index-length",
        "truncated",
        "cut-1",
        "empty",
    ],
)
async def test_read_footers_leaves_out_a_segment_with_a_damaged_index(
    damage: Callable[[bytes], bytes],
) -> None:
    backup = await build(MemoryStorage())
    bad = backup.names[3]
    await rewrite(backup.storage, bad, damage)

    stats = FooterStats()
    blocks = await read_footers(backup.storage, PREFIX, stats=stats)
    assert [name for name, _ in stats.damaged] == [bad]
    assert bad in stats.damaged[0][1]
    assert stats.segments == len(backup.names) - 1
    assert {b.name for b in blocks} == set(backup.names) - {bad}
    assert stats.blocks == len(blocks)
    with pytest.raises(CorruptObject, match=bad):
        await read_footer_of(backup.storage, ObjectInfo(bad, len(await backup.storage.get(bad))))

    # The others are still planned, and read exactly.
    winners, reads = await read_all(backup.storage, plan_ranges(blocks, budget=2000))
    assert all(not r.damaged for r in reads)
    assert winners == brute(backup.records, skip=lambda s: s.name == bad)


@pytest.mark.anyio
async def test_read_footers_skips_a_segment_deleted_since_the_listing() -> None:
    storage = CountingStorage()
    backup = await build(storage)
    gone = backup.names[2]
    storage.vanish.add(gone)
    stats = FooterStats()
    blocks = await read_footers(storage, PREFIX, stats=stats)
    assert stats.damaged == []
    assert stats.segments == len(backup.names) - 1
    assert {b.name for b in blocks} == set(backup.names) - {gone}


# --- planning ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("budget", [1, 700, 5000, HUGE])
@pytest.mark.parametrize("at", ["none", "median", "first"])
async def test_plan_ranges_cover_every_record_with_its_block(
    seed: int, budget: int, at: str
) -> None:
    backup = await build(MemoryStorage(), seed)
    reads = sorted(s.rec.read_at_us for s in backup.records)
    at_us = {"none": None, "median": median_read(backup), "first": reads[0]}[at]
    ranges = await planned(backup, budget=budget, at_us=at_us)
    check_plan(backup, ranges, budget=budget, at_us=at_us)
    if at_us is not None:
        assert len({(b.name, b.info.offset) for r in ranges for b in r.blocks}) < len(backup.refs())
    if budget == HUGE:
        assert len(ranges) == 1
        assert len(ranges[0].blocks) == len({(b.name, b.info.offset) for b in ranges[0].blocks})
    if budget == 1:
        # One new block per range, with those starting at the same key.
        starts = {
            b.first
            for blocks in backup.blocks.values()
            for b in blocks
            if at_us is None or b.min_read_at_us <= at_us
        }
        assert len(ranges) == len(starts)
        assert [r.lo for r in ranges[1:]] == sorted(starts)[1:]


@pytest.mark.anyio
async def test_plan_ranges_of_blocks_all_read_after_at_is_empty() -> None:
    backup = await build(MemoryStorage())
    earliest = min(s.rec.read_at_us for s in backup.records)
    assert await planned(backup, at_us=earliest - 1) == []
    assert await planned(backup, at_us=earliest - 1, db=1) == []


def _ref(name: str, first: Key, last: Key, length: int = 100, offset: int = 16) -> BlockRef:
    info = BlockInfo(offset, length, 1000, 10, first, last, 5, 9, 1, 2, b"\x00" * 32)
    return BlockRef(name, info)


def test_plan_ranges_keeps_blocks_starting_at_one_key_together() -> None:
    blocks = [
        _ref("a", (0, b"k"), (0, b"m")),
        _ref("b", (0, b"k"), (0, b"k")),
        _ref("c", (0, b"k"), (0, b"z")),
        _ref("d", (0, b"l"), (0, b"l")),
    ]
    ranges = plan_ranges(blocks, budget=1)
    assert [(r.lo, r.hi) for r in ranges] == [(None, (0, b"l")), ((0, b"l"), None)]
    assert [b.name for b in ranges[0].blocks] == ["a", "b", "c"]
    # a and c reach past (0, b"l"): carried over into the next range, which holds them too.
    assert sorted(b.name for b in ranges[1].blocks) == ["a", "c", "d"]


def test_plan_ranges_takes_a_new_block_even_when_carried_ones_fill_the_budget() -> None:
    blocks = [_ref("wide", (0, b"a"), (0, b"z"), length=10**6)] + [
        _ref(f"n{i}", (0, bytes([0x62 + i])), (0, bytes([0x62 + i]))) for i in range(5)
    ]
    ranges = plan_ranges(blocks, budget=10)
    assert len(ranges) == 6
    for r in ranges:
        assert r.blocks[0].name == "wide"
        assert len(r.blocks) == (1 if r.lo is None else 2)


@pytest.mark.anyio
@pytest.mark.parametrize("db", [0, 1, 2, 7])
@pytest.mark.parametrize("budget", [1, 2000, HUGE])
async def test_plan_ranges_of_one_db_cover_its_records(db: int, budget: int) -> None:
    backup = await build(MemoryStorage())
    ranges = await planned(backup, budget=budget, db=db)
    expected = brute(backup.records, db=db)
    if db == 7:
        assert ranges == []
        return
    # Every record of the db is in a block its key's one range names.
    for s in backup.records:
        if s.rec.db == db:
            holding = [r for r in ranges if r.holds(s.key)]
            assert len(holding) == 1, s.key
            assert (s.name, s.block) in {(b.name, b.info.offset) for b in holding[0].blocks}
    assert {(b.name, b.info.offset) for r in ranges for b in r.blocks} == {
        (name, b.offset)
        for name, bs in backup.blocks.items()
        for b in bs
        if b.first[0] <= db <= b.last[0]
    }
    assert ranges[0].lo == (db, b"") and ranges[-1].hi == (db + 1, b"")
    winners, _ = await read_all(backup.storage, ranges)
    assert {k: v for k, v in winners.items() if k[0] == db} == expected


@pytest.mark.anyio
@pytest.mark.parametrize("budget", [1, HUGE])
async def test_plan_ranges_of_one_db_bounded_when_one_block_starts_before_it(budget: int) -> None:
    # A single segment: at most one block starts in an earlier db and reaches into this one.
    backup = Backup(MemoryStorage())
    (_, records), *_ = random_segments(5)
    await store_segment(backup, records, block_records=7, uid=0)
    for db in DBS:
        ranges = await planned(backup, budget=budget, db=db)
        check_plan(backup, ranges, budget=budget, db=db)
        winners, _ = await read_all(backup.storage, ranges)
        assert winners == brute(backup.records, db=db)


@pytest.mark.anyio
async def test_plan_ranges_of_one_db_stay_within_it_when_blocks_start_before_it() -> None:
    storage = MemoryStorage()
    backup = Backup(storage)
    await store_segment(
        backup,
        [make_record(0, b"a", stamp=1, read_at_us=1), make_record(1, b"c", stamp=2, read_at_us=2)],
        block_records=500,
        uid=1,
    )
    await store_segment(
        backup,
        [make_record(0, b"b", stamp=3, read_at_us=3), make_record(1, b"d", stamp=4, read_at_us=4)],
        block_records=500,
        uid=2,
    )
    ranges = await planned(backup, budget=1, db=1)
    winners, _ = await read_all(storage, ranges)
    assert sorted(winners) == [(1, b"c"), (1, b"d")]  # actually also (0, b"b")
    check_plan(backup, ranges, budget=1, db=1)  # actually a range from (1, b"") to (0, b"b")


@pytest.mark.anyio
@pytest.mark.parametrize("db", [1, 2])
@pytest.mark.parametrize("budget", [1, 2000])
async def test_plan_ranges_of_one_db_stay_within_it_on_random_data(db: int, budget: int) -> None:
    backup = await build(MemoryStorage())
    ranges = await planned(backup, budget=budget, db=db)
    winners, _ = await read_all(backup.storage, ranges)
    assert {k[0] for k in winners} == {db}
    check_plan(backup, ranges, budget=budget, db=db)


# --- reading -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "fs"])
@pytest.mark.parametrize("budget", [1, 3000, HUGE])
@pytest.mark.parametrize("at", ["none", "median"])
async def test_read_range_finds_the_newest_record_of_every_key_once(
    kind: str, budget: int, at: str, tmp_path: Path
) -> None:
    async with backend(kind, tmp_path) as storage:
        backup = await build(storage, seed=budget % 7 + 11)
        at_us = None if at == "none" else median_read(backup)
        ranges = await planned(backup, budget=budget, at_us=at_us)
        winners, reads = await read_all(storage, ranges, at_us=at_us)
        expected = brute(backup.records, at_us=at_us)
        assert winners == expected
        assert all(r.damaged == [] and r.undecided == [] for r in reads)
        assert [r.fetched for r in reads] == [r.size for r in ranges]
        # Tombstones win like any record: the caller decides what they mean.
        assert any(rec.tombstone for rec, _ in winners.values())
        # The stamp decides, not the read time: some winners were read before a loser.
        assert any(
            s.key in winners
            and s.rec.read_at_us > winners[s.key][0].read_at_us
            and (at_us is None or s.rec.read_at_us <= at_us)
            for s in backup.records
        )


@pytest.mark.anyio
async def test_read_range_with_a_later_at_than_any_read_sees_everything() -> None:
    backup = await build(MemoryStorage())
    latest = max(s.rec.read_at_us for s in backup.records)
    ranges = await planned(backup, budget=1500, at_us=latest)
    winners, _ = await read_all(backup.storage, ranges, at_us=latest)
    assert winners == brute(backup.records)


@pytest.mark.anyio
async def test_read_range_keeps_only_the_keys_inside_the_range() -> None:
    backup = await build(MemoryStorage())
    (whole,) = await planned(backup)
    lo, hi = (1, b"\x00"), (2, b"\x80")
    got = await read_range(backup.storage, Range(lo, hi, whole.blocks))
    assert got.winners == {k: v for k, v in brute(backup.records).items() if lo <= k < hi}


@pytest.mark.anyio
async def test_read_range_decides_stamp_ties_by_read_time() -> None:
    storage = MemoryStorage()
    backup = Backup(storage)
    old = make_record(0, b"k", stamp=0, read_at_us=100)
    new = make_record(0, b"k", stamp=0, read_at_us=200)
    await store_segment(backup, [new], block_records=5, uid=1)
    await store_segment(backup, [old], block_records=5, uid=2)
    (whole,) = await planned(backup)
    assert (await read_range(storage, whole)).winners == {(0, b"k"): (new, backup.names[0])}
    assert (await read_range(storage, whole, at_us=150)).winners == {
        (0, b"k"): (old, backup.names[1])
    }
    assert (await read_range(storage, whole, at_us=99)).winners == {}


# --- damage --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("budget", [1, 1500, HUGE])
@pytest.mark.parametrize("where", ["middle", "start", "end"])
async def test_a_damaged_block_leaves_its_keys_undecided_and_the_rest_exact(
    budget: int, where: str
) -> None:
    backup = await build(MemoryStorage())
    name = backup.names[0]  # many narrow blocks
    infos = backup.blocks[name]
    bad = infos[len(infos) // 2]
    at = {"middle": bad.length // 2, "start": 0, "end": bad.length - 1}[where]
    await rewrite(backup.storage, name, flip(bad.offset + at))
    ranges = await planned(backup, budget=budget)  # the index is intact: planned as usual

    winners, reads = await read_all(backup.storage, ranges)
    damages = [d for r in reads for d in r.damaged]
    naming = [
        r for r in ranges if any((b.name, b.info.offset) == (name, bad.offset) for b in r.blocks)
    ]
    assert len(damages) == len(naming) >= 1  # once per range that fetched it
    if budget == HUGE:
        assert len(damages) == 1
    for d in damages:
        assert d == Damage(
            name, bad.offset, bad.first, bad.last, bad.count, d.reason, bad.max_stamp
        )
        assert name in d.reason and f"offset {bad.offset}" in d.reason
    for r in reads:  # each range reports exactly its own
        assert r.undecided == [k for k in r.undecided if r.covering(k) is not None]

    def in_span(key: Key) -> bool:
        return bad.first <= key <= bad.last

    elsewhere = brute(backup.records, skip=lambda s: (s.name, s.block) == (name, bad.offset))

    def shadowed(key: Key) -> bool:
        """In the span, and no record elsewhere is newer than all the block held."""
        return in_span(key) and (key not in elsewhere or elsewhere[key][0].stamp <= bad.max_stamp)

    undecided = [k for r in reads for k in r.undecided]
    assert len(undecided) == len(set(undecided))
    assert set(undecided) == {k for k in elsewhere if shadowed(k)}
    assert set(undecided).isdisjoint(winners)
    assert winners == {k: v for k, v in brute(backup.records).items() if not shadowed(k)}
    # The damaged block held keys no other block has: those are neither won nor undecided.
    for r in reads:
        for key in r.undecided:
            assert r.covering(key) == next(d for d in r.damaged)
    # The rule is there to be seen: some keys of the span were decided by newer records.
    assert any(in_span(k) for k in winners) or not any(
        in_span(k) and v[0].stamp > bad.max_stamp for k, v in elsewhere.items()
    )


@pytest.mark.anyio
async def test_a_segment_deleted_after_planning_is_reported_gone() -> None:
    backup = await build(MemoryStorage())
    gone = backup.names[3]
    ranges = await planned(backup)
    await backup.storage.delete(gone)

    winners, reads = await read_all(backup.storage, ranges)
    (read,) = reads
    assert sorted(d.block for d in read.damaged) == [b.offset for b in backup.blocks[gone]]
    for d in read.damaged:
        assert d.name == gone and "gone from storage" in d.reason and gone in d.reason
    spans = [(b.first, b.last, b.max_stamp) for b in backup.blocks[gone]]
    elsewhere = brute(backup.records, skip=lambda s: s.name == gone)

    def covered(key: Key) -> bool:
        newest = elsewhere[key][0].stamp if key in elsewhere else -1
        return any(first <= key <= last and newest <= top for first, last, top in spans)

    assert set(read.undecided) == {k for k in elsewhere if covered(k)}
    assert winners == {k: v for k, v in brute(backup.records).items() if not covered(k)}
    assert read.fetched == ranges[0].size - sum(b.length for b in backup.blocks[gone])


@pytest.mark.anyio
async def test_a_block_cut_short_is_damage() -> None:
    backup = await build(MemoryStorage())
    name = backup.names[0]
    ranges = await planned(backup)
    last = backup.blocks[name][-1]
    # A shorter object: the last block comes back cut, the others whole.
    await rewrite(backup.storage, name, lambda data: data[: last.offset + 3])
    _, (read,) = await read_all(backup.storage, ranges)
    (damage,) = read.damaged
    assert (damage.name, damage.block) == (name, last.offset)
    assert "3 bytes, the index says" in damage.reason


# --- the JSON of a range -------------------------------------------------------------------


@pytest.mark.anyio
async def test_range_json_round_trip_of_planned_ranges() -> None:
    backup = await build(MemoryStorage())
    for budget in (1, HUGE):
        for rng in await planned(backup, budget=budget):
            text = rng.to_json()
            assert Range.from_json(text) == rng
            assert Range.from_json(text.encode()) == rng


@pytest.mark.parametrize(
    "lo, hi",
    [
        (None, None),
        ((0, b""), (0, b"\x00")),
        ((3, b"\x00"), (3, b"\xff")),
        ((0, b"\xff" * 50), None),
        (None, (2**32 - 1, bytes(range(256)))),
    ],
)
def test_range_json_round_trip_of_binary_bounds(lo: Key | None, hi: Key | None) -> None:
    blocks = (
        _ref("bk/segments/0/a.seg", (0, b""), (0, b"\x00\xff")),
        BlockRef(
            "bk/segments/1/b.seg",
            BlockInfo(
                16, 7, 9, 2, (1, b"\xff"), (2, b""), 0, 2**64 - 1, 0, 2**64 - 1, bytes(range(32))
            ),
        ),
    )
    for rng in (Range(lo, hi, ()), Range(lo, hi, blocks)):
        back = Range.from_json(rng.to_json())
        assert back == rng
        assert back.lo == lo and back.hi == hi and back.blocks == rng.blocks


GOOD_BLOCK = '["n",16,1,1,1,[0,""],[0,"AA=="],0,0,0,0,"00"]'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "null",
        "[]",
        "5",
        '"text"',
        "{}",
        '{"lo":null,"hi":null}',
        '{"lo":null,"b":[]}',
        '{"lo":null,"hi":null,"b":5}',
        '{"lo":5,"hi":null,"b":[]}',
        '{"lo":{},"hi":null,"b":[]}',
        '{"lo":["x","AA=="],"hi":null,"b":[]}',
        '{"lo":[0,"!!"],"hi":null,"b":[]}',
        '{"lo":[0,"AAA"],"hi":null,"b":[]}',
        '{"lo":[0,5],"hi":null,"b":[]}',
        '{"lo":null,"hi":null,"b":[5]}',
        '{"lo":null,"hi":null,"b":[["n",16,1,1,1,null,[0,""],0,0,0,0,"00"]]}',
        '{"lo":null,"hi":null,"b":[["n",16,1,1,1,[0,""],null,0,0,0,0,"00"]]}',
        '{"lo":null,"hi":null,"b":[["n",16,1,1,1,[0,""],[0,""],0,0,0,0,"zz"]]}',
        '{"lo":null,"hi":null,"b":[["n","x",1,1,1,[0,""],[0,""],0,0,0,0,"00"]]}',
        '{"lo":null,"hi":null,"b":[["n",16,1,1,1,[0,""],[0,""],0,0,0,null,"00"]]}',
        "\xff",
        b"\xff\xfe",
    ],
)
def test_range_from_json_of_malformed_text_raises(text: str | bytes) -> None:
    assert Range.from_json('{"lo":null,"hi":null,"b":[' + GOOD_BLOCK + "]}").blocks[0].name == "n"
    with pytest.raises((ValueError, KeyError, TypeError)):
        Range.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"lo":[0],"hi":null,"b":[]}',
        '{"lo":[],"hi":null,"b":[]}',
        '{"lo":null,"hi":null,"b":[["n",16,1]]}',
    ],
)
def test_range_from_json_of_short_lists_raises_a_documented_error(text: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Range.from_json(text)


# --- range cursors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [None, (0, b""), (0, b"\x00"), (1, b"\xff"), (15, b"user:1"), (2**32 - 1, bytes(range(256)))],
)
def test_range_key_round_trip(key: Key | None) -> None:
    text = range_key_out(key)
    assert isinstance(text, str)
    assert range_key_in(text) == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[",
        "[0]",
        "[]",
        "5",
        '"x"',
        "{}",
        '["a","AA=="]',
        '[0,"!!"]',
        '[0,"A"]',
        "[0,5]",
        "[null,null]",
    ],
)
def test_range_key_in_of_garbage_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        range_key_in(text)


# --- the key index for re-checks -----------------------------------------------------------


@pytest.mark.anyio
async def test_segment_index_looks_up_the_newest_records_of_keys() -> None:
    storage = CountingStorage()
    backup = await build(storage)
    index = SegmentIndex(storage, PREFIX)
    await index.refresh()
    newest = brute(backup.records)
    rng = random.Random(4)
    keys = [*rng.sample(sorted(newest), 25), (1, b""), (1, b"\xff"), (1, b"\x00")]
    got = await index.lookup(keys)
    assert got.winners == {k: newest[k] for k in keys}
    assert got.damaged == [] and got.undecided == []
    # Keys no segment holds, inside some block's span or beyond them all.
    assert (
        await index.lookup([(0, b"\x00\x00\x00\x00\x00"), (9, b"x"), (0, b"\xff" * 9)])
    ).winners == {}

    # Indexes are fetched once: a second refresh only lists.
    storage.ranged.clear()
    await index.refresh()
    assert storage.ranged == []


@pytest.mark.anyio
async def test_segment_index_sees_new_segments_and_forgets_deleted_ones() -> None:
    storage = MemoryStorage()
    backup = await build(storage)
    index = SegmentIndex(storage, PREFIX)
    await index.refresh()
    key = (1, b"\xff")
    before = brute(backup.records)[key]

    newer_rec = make_record(1, b"\xff", stamp=2 * 10**9, read_at_us=1)
    fresh = make_record(2, b"brand-new", stamp=2 * 10**9, read_at_us=1)
    fresh_key = (2, b"brand-new")
    added = await store_segment(backup, [newer_rec, fresh], block_records=1, uid=77)
    assert (await index.lookup([key, fresh_key])).winners == {key: before}
    await index.refresh()
    assert (await index.lookup([key, fresh_key])).winners == {
        key: (newer_rec, added),
        fresh_key: (fresh, added),
    }

    # Deleted, not yet refreshed: the lookup finds its blocks gone and plans the key again
    # from what storage holds now, as it would after a compaction deleted them.
    await storage.delete(added)
    got = await index.lookup([key, fresh_key])
    assert got.winners == {key: before} and got.damaged == [] and got.undecided == []
    await index.refresh()
    got = await index.lookup([key, fresh_key])
    assert got.winners == {key: before} and got.damaged == []


@pytest.mark.anyio
async def test_segment_index_skips_a_damaged_index_and_reports_a_damaged_block() -> None:
    storage = MemoryStorage()
    backup = await build(storage)
    await rewrite(storage, backup.names[2], _break_index)
    index = SegmentIndex(storage, PREFIX)
    await index.refresh()
    newest = brute(backup.records, skip=lambda s: s.name == backup.names[2])
    keys = sorted(newest)
    assert (await index.lookup(keys)).winners == newest

    name = backup.names[0]
    bad = backup.blocks[name][3]
    await rewrite(storage, name, flip(bad.offset + 1))
    got = await index.lookup(keys)
    covered = [k for k in keys if bad.first <= k <= bad.last]
    elsewhere = brute(
        backup.records,
        skip=lambda s: s.name == backup.names[2] or (s.name, s.block) == (name, bad.offset),
    )
    assert covered
    shadowed = [k for k in covered if k not in elsewhere or elsewhere[k][0].stamp <= bad.max_stamp]
    assert sorted(got.undecided) == [k for k in shadowed if k in elsewhere]
    assert {(d.name, d.block) for d in got.damaged} == {(name, bad.offset)}
    assert got.winners == {k: v for k, v in newest.items() if k not in shadowed}


# --- the keys layout's say -----------------------------------------------------------------


@pytest.mark.anyio
async def test_prefer_keys_layout_takes_objects_read_later() -> None:
    storage = MemoryStorage()
    seg = "bk/segments/0/x.seg"
    base = {
        (0, b"older"): make_record(0, b"older", stamp=50, read_at_us=1000),
        (0, b"newer"): make_record(0, b"newer", stamp=50, read_at_us=1000),
        (1, b"same"): make_record(1, b"same", stamp=50, read_at_us=1000),
        (1, b"after-at"): make_record(1, b"after-at", stamp=50, read_at_us=1000),
        (2, b"\x00\xff"): make_record(2, b"\x00\xff", stamp=50, read_at_us=1000, tombstone=True),
        (2, b"absent"): make_record(2, b"absent", stamp=50, read_at_us=1000),
        (2, b""): make_record(2, b"", stamp=50, read_at_us=1000),
    }
    keys_layout = {
        (0, b"older"): make_record(0, b"older", stamp=0, read_at_us=999),
        (0, b"newer"): make_record(0, b"newer", stamp=0, read_at_us=1001),
        (1, b"same"): make_record(1, b"same", stamp=0, read_at_us=1000),
        (1, b"after-at"): make_record(1, b"after-at", stamp=0, read_at_us=5000),
        (2, b"\x00\xff"): make_record(2, b"\x00\xff", stamp=0, read_at_us=1500),
        (2, b""): make_record(2, b"", stamp=0, read_at_us=1200, tombstone=True),
    }
    for (db, key), rec in keys_layout.items():
        await storage.put(latest_name(PREFIX, db, key), codec.encode(rec))
    # An object of another prefix is not looked at.
    await storage.put(latest_name("other/", 0, b"older"), codec.encode(keys_layout[(0, b"newer")]))

    def run_winners() -> dict[Key, tuple[KeyRecord, str]]:
        return {k: (r, seg) for k, r in base.items()}

    def name(key: Key) -> str:
        return latest_name(PREFIX, key[0], key[1])

    winners = run_winners()
    damaged: list[tuple[str, str]] = []
    await prefer_keys_layout(
        storage, PREFIX, winners, on_damaged=lambda n, r: damaged.append((n, r))
    )
    replaced = [(0, b"newer"), (1, b"after-at"), (2, b"\x00\xff"), (2, b"")]
    assert winners == {
        k: (keys_layout[k], name(k)) if k in replaced else (r, seg) for k, r in base.items()
    }
    assert damaged == []

    winners = run_winners()
    await prefer_keys_layout(storage, PREFIX, winners, at_us=1500)
    replaced = [(0, b"newer"), (2, b"\x00\xff"), (2, b"")]  # read at 5000: after --at
    assert winners == {
        k: (keys_layout[k], name(k)) if k in replaced else (r, seg) for k, r in base.items()
    }

    winners = run_winners()
    await prefer_keys_layout(storage, PREFIX, winners, at_us=1499)
    replaced = [(0, b"newer"), (2, b"")]
    assert winners == {
        k: (keys_layout[k], name(k)) if k in replaced else (r, seg) for k, r in base.items()
    }

    empty: dict[Key, tuple[KeyRecord, str]] = {}
    await prefer_keys_layout(storage, PREFIX, empty)
    assert empty == {}


@pytest.mark.anyio
@pytest.mark.parametrize("report", [True, False])
async def test_prefer_keys_layout_passes_over_a_damaged_object(report: bool) -> None:
    storage = MemoryStorage()
    seg = "bk/segments/0/x.seg"
    bad_key, good_key = (0, b"bad"), (0, b"good")
    winners = {
        bad_key: (make_record(0, b"bad", stamp=1, read_at_us=10), seg),
        good_key: (make_record(0, b"good", stamp=1, read_at_us=10), seg),
    }
    later = {k: make_record(k[0], k[1], stamp=0, read_at_us=20) for k in winners}
    for (db, key), rec in later.items():
        await storage.put(latest_name(PREFIX, db, key), codec.encode(rec))
    bad_name = latest_name(PREFIX, *bad_key)
    await rewrite(storage, bad_name, flip(30))

    damaged: list[tuple[str, str]] = []
    await prefer_keys_layout(
        storage,
        PREFIX,
        winners,
        on_damaged=(lambda n, r: damaged.append((n, r))) if report else None,
    )
    assert winners[bad_key][1] == seg and winners[bad_key][0].read_at_us == 10
    assert winners[good_key] == (later[good_key], latest_name(PREFIX, *good_key))
    if report:
        assert len(damaged) == 1 and damaged[0][0] == bad_name
        assert bad_name in damaged[0][1] and "checksum" in damaged[0][1]


class _CountingRanges(MemoryStorage):
    """Counts ranged GETs."""

    def __init__(self) -> None:
        super().__init__()
        self.ranged: list[tuple[str, int, int]] = []

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        self.ranged.append((name, start, length))
        return await super().get_range(name, start, length)


@pytest.mark.anyio
async def test_neighbouring_blocks_of_one_segment_come_in_one_ranged_get() -> None:
    storage = _CountingRanges()
    backup = await build(storage)
    ranges = await planned(backup, budget=HUGE)
    (rng,) = ranges
    storage.ranged.clear()
    read = await read_range(storage, rng)
    # Every block of a segment follows the one before: one GET per segment, not per block.
    assert len(storage.ranged) == len(backup.names) < len(rng.blocks)
    assert read.fetched == rng.size
    assert read.winners == brute(backup.records)
