"""Segments: round trips, block cutting, footer reads, every kind of damage, and names."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
from collections.abc import Callable

import pytest
import zstandard

from rrb_streams.errors import CorruptObject
from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import MAGIC, KeyRecord, decode, encode
from rrb_streams.format.layout import latest_name, version_name
from rrb_streams.format.segment import (
    SEGMENT_VERSION,
    SEGMENTS_DIR,
    TAIL_READ,
    TRAILER_SIZE,
    BlockInfo,
    Footer,
    NeedMore,
    SegmentName,
    decode_block,
    decode_segment,
    is_segment,
    new_uid,
    newer,
    parse_segment_name,
    read_footer,
    segment_name,
    segments_prefix,
)
from rrb_streams.storage.base import check_name

UID = "0123456789abcdef"


def record(key: bytes = b"k", payload: bytes = b"\x00dump\xff", **changes: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key": key,
        "db": 3,
        "type": "string",
        "expire_at_ms": 1_900_000_000_123,
        "read_at_us": 1_700_000_000_000_001,
        "entry_id": "1700000000000-7",
        "redis_version": "7.0.15",
        "payload": payload,
        "stamp": 1_700_000_000_000_500,
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def order(rec: KeyRecord) -> tuple[int, bytes, int, int]:
    return (rec.db, rec.key, rec.stamp, rec.read_at_us)


def many(n: int, payload: int = 64, seed: int = 1) -> list[KeyRecord]:
    rng = random.Random(seed)
    return [
        record(
            key=f"user:{i:06d}".encode(),
            payload=rng.randbytes(payload),
            read_at_us=1_700_000_000_000_000 + i,
            stamp=1_700_000_000_001_000 + rng.randrange(1000),
        )
        for i in range(n)
    ]


def flatten(blocks: list[list[KeyRecord] | CorruptObject]) -> list[KeyRecord]:
    out = []
    for b in blocks:
        assert isinstance(b, list), b
        out += b
    return out


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def entry(info: BlockInfo) -> bytes:
    """An index entry packed from the documented layout, independently of the module."""
    (fdb, fkey), (ldb, lkey) = info.first, info.last
    return (
        struct.pack(">QIIII", info.offset, info.length, info.raw_length, info.count, fdb)
        + struct.pack(">I", len(fkey))
        + fkey
        + struct.pack(">II", ldb, len(lkey))
        + lkey
        + struct.pack(
            ">QQQQ", info.min_read_at_us, info.max_read_at_us, info.min_stamp, info.max_stamp
        )
        + info.checksum
    )


def assemble(body: bytes, infos: list[BlockInfo], header: bytes | None = None) -> bytes:
    """An object with valid index, trailer and object checksums around ``body``."""
    header = MAGIC + bytes([SEGMENT_VERSION, 0x53]) + bytes(10) if header is None else header
    index = struct.pack(">I", len(infos)) + b"".join(map(entry, infos))
    head = header + body + index + struct.pack(">QI", len(header) + len(body), len(index))
    head += sha(index)
    return head + sha(head) + b"RRB2"


def reindexed(data: bytes, **changes: object) -> bytes:
    """``data`` resealed with its first block's index entry changed."""
    footer = read_footer(data, len(data), "orig")
    infos = list(footer.blocks)
    infos[0] = dataclasses.replace(infos[0], **changes)  # type: ignore[arg-type]
    return assemble(data[16 : footer.index_offset], infos)


MIXED = [
    record(),
    record(key=b""),
    record(key=b"", db=0, stamp=0, read_at_us=0),
    record(key=b"\x00"),
    record(key=bytes(range(256))),
    record(key=os.urandom(10 * 1024)),
    record(key=b"empty", payload=b""),
    record(key=b"persistent", expire_at_ms=None),
    record(key=b"expire-0", expire_at_ms=0),
    record(key=b"max", db=2**32 - 1, read_at_us=2**64 - 1, stamp=2**64 - 1, type="x" * 255),
    record(key=b"strings", entry_id="", redis_version="", type="stream"),
    KeyRecord.absent(b"\xffgone\x00", 15, 1_700_000_000_000_002, "1-1", "7.0.15"),
    dataclasses.replace(KeyRecord.absent(b"k", 3, 9, "1-2", "7.0.15"), stamp=7),
    # one key read several times: the stamp orders them, read_at_us only breaks ties
    record(key=b"hot", stamp=30, read_at_us=1, payload=b"third"),
    record(key=b"hot", stamp=10, read_at_us=3, payload=b"first"),
    record(key=b"hot", stamp=20, read_at_us=2, payload=b"second"),
    record(key=b"hot", stamp=20, read_at_us=1, payload=b"second-tie"),
    record(key=b"hot", db=0, stamp=5, payload=b"other db"),
    record(key=b"hot", db=1, stamp=5, payload=b"db one"),
]


@pytest.mark.parametrize("block_records", [1, 3, 500])
def test_segment_round_trips_mixed_records_in_key_order(block_records: int) -> None:
    shuffled = random.Random(7).sample(MIXED, len(MIXED))
    data = encode_segment(shuffled, block_records=block_records)
    assert is_segment(data)
    footer, blocks = decode_segment(data, "seg")
    assert flatten(blocks) == sorted(MIXED, key=order)
    assert footer.records == len(MIXED)
    assert [r.payload for r in flatten(blocks) if r.key == b"hot" and r.db == 3] == [
        b"first",
        b"second-tie",
        b"second",
        b"third",
    ]


def test_segment_layout_matches_the_documented_format() -> None:
    recs = [record(key=b"KEY", payload=b"PAY", expire_at_ms=None, stamp=5, read_at_us=6)]
    data = encode_segment(recs)
    assert data[:16] == b"\x89RRB\x02\x53" + bytes(10)
    assert data[-4:] == b"RRB2"
    assert data[-36:-4] == sha(data[:-36])
    index_offset, index_length, index_digest = struct.unpack(">QI32s", data[-80:-36])
    footer = read_footer(data, len(data), "seg")
    assert footer.index_offset == index_offset == 16 + footer.blocks[0].length
    index = data[index_offset : index_offset + index_length]
    assert index_offset + index_length == len(data) - TRAILER_SIZE
    assert index_digest == sha(index)
    assert index == struct.pack(">I", 1) + entry(footer.blocks[0])
    info = footer.blocks[0]
    block = data[info.offset : info.offset + info.length]
    assert info.checksum == sha(block)
    raw = zstandard.ZstdDecompressor().decompress(block)
    assert raw == (
        struct.pack(">II", 3, 3)
        + b"KEY"
        + struct.pack(">BqQQ", 0, -1, 6, 5)
        + b"\x06string\x0f1700000000000-7\x067.0.15"
        + struct.pack(">Q", 3)
        + b"PAY"
    )
    tomb = encode_segment([KeyRecord.absent(b"k", 0, 5, "", "")])
    info = read_footer(tomb, len(tomb), "t").blocks[0]
    raw = zstandard.ZstdDecompressor().decompress(tomb[info.offset : info.offset + info.length])
    assert raw[9] == 1  # the flags byte after db, key length and the one-byte key


def test_segment_blocks_close_at_the_record_count() -> None:
    recs = many(1200)
    data = encode_segment(recs)
    footer, blocks = decode_segment(data, "seg")
    assert [b.count for b in footer.blocks] == [500, 500, 200]
    assert flatten(blocks) == sorted(recs, key=order)
    for info, got in zip(footer.blocks, blocks, strict=True):
        assert isinstance(got, list)
        assert info.first == (got[0].db, got[0].key)
        assert info.last == (got[-1].db, got[-1].key)
        assert info.min_stamp == min(r.stamp for r in got)
        assert info.max_stamp == max(r.stamp for r in got)
        assert info.min_read_at_us == min(r.read_at_us for r in got)
        assert info.max_read_at_us == max(r.read_at_us for r in got)
    assert footer.min_stamp == min(r.stamp for r in recs)
    assert footer.max_stamp == max(r.stamp for r in recs)
    assert footer.min_read_at_us == min(r.read_at_us for r in recs)
    assert footer.max_read_at_us == max(r.read_at_us for r in recs)


def test_segment_blocks_close_at_the_byte_limit() -> None:
    recs = many(100, payload=200)
    data = encode_segment(recs, block_bytes=1000)
    footer, blocks = decode_segment(data, "seg")
    assert flatten(blocks) == sorted(recs, key=order)
    assert all(500 < b.raw_length <= 1000 for b in footer.blocks[:-1])
    assert sum(b.count for b in footer.blocks) == 100
    assert len({b.count for b in footer.blocks[:-1]}) == 1  # equal records: equal blocks


def test_segment_puts_a_huge_record_in_a_block_of_its_own() -> None:
    huge = record(key=b"m-huge", payload=os.urandom(2 * 1024 * 1024))
    small = [record(key=f"{c}-{i}".encode()) for c in "az" for i in range(5)]
    data = encode_segment([*small, huge])
    footer, blocks = decode_segment(data, "seg")
    assert [b.count for b in footer.blocks] == [5, 1, 5]
    assert footer.blocks[1].first == footer.blocks[1].last == (3, b"m-huge")
    assert footer.blocks[1].raw_length > 256 * 1024
    assert blocks[1] == [huge]


def test_segment_lets_one_key_straddle_blocks() -> None:
    recs = [record(key=b"same", stamp=s) for s in range(10)] + [record(key=b"t")]
    data = encode_segment(recs, block_records=3)
    footer, blocks = decode_segment(data, "seg")
    assert [b.count for b in footer.blocks] == [3, 3, 3, 2]
    assert footer.blocks[0].last == footer.blocks[1].first == (3, b"same")
    assert footer.blocks[3].first == (3, b"same") and footer.blocks[3].last == (3, b"t")
    assert [r.stamp for r in flatten(blocks)[:10]] == list(range(10))


def test_segment_compresses_its_blocks() -> None:
    recs = [record(key=f"k{i:04d}".encode(), payload=b"value-" * 20) for i in range(500)]
    data = encode_segment(recs)
    (info,) = read_footer(data, len(data), "seg").blocks
    assert info.count == 500
    assert info.length * 10 < info.raw_length
    assert len(data) * 10 < sum(len(encode(r)) for r in recs)


def test_segment_refuses_to_encode_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="at least one record"):
        encode_segment([])
    with pytest.raises(ValueError, match="entry_id"):
        encode_segment([record(entry_id="1" * 256)])
    with pytest.raises(ValueError, match="does not fit"):
        encode_segment([record(db=2**32)])
    with pytest.raises(ValueError, match="does not fit"):
        encode_segment([record(stamp=-1)])
    with pytest.raises(ValueError, match="positive"):
        encode_segment([record()], block_records=0)


def test_segment_footer_of_no_blocks_is_all_zero() -> None:
    footer = Footer((), 16)
    assert (footer.records, footer.min_stamp, footer.max_stamp) == (0, 0, 0)
    assert (footer.min_read_at_us, footer.max_read_at_us) == (0, 0)


def test_read_footer_asks_for_more_when_the_index_is_longer_than_the_tail() -> None:
    recs = many(1500, payload=8)
    data = encode_segment(recs, block_records=1)
    whole = read_footer(data, len(data), "seg")
    needed = len(data) - whole.index_offset
    assert needed > TAIL_READ  # 1500 index entries do not fit the first read
    with pytest.raises(NeedMore) as info:
        read_footer(data[-TAIL_READ:], len(data), "seg")
    assert info.value.needed == needed
    assert not isinstance(info.value, CorruptObject)
    with pytest.raises(NeedMore) as info:
        read_footer(data[-(needed - 1) :], len(data), "seg")
    assert info.value.needed == needed
    assert read_footer(data[-needed:], len(data), "seg") == whole
    assert whole.records == 1500
    with pytest.raises(NeedMore) as info:
        read_footer(data[-10:], len(data), "seg")
    assert info.value.needed == TRAILER_SIZE


def test_read_footer_from_the_usual_tail_then_ranged_blocks() -> None:
    recs = many(1200)
    data = encode_segment(recs)
    footer = read_footer(data[-TAIL_READ:], len(data), "seg")
    assert footer == read_footer(data, len(data), "seg")
    got = [
        r
        for b in footer.blocks
        for r in decode_block(data[b.offset : b.offset + b.length], b, "seg")
    ]
    assert got == sorted(recs, key=order)


def test_read_footer_refuses_a_tail_longer_than_the_object() -> None:
    data = encode_segment([record()])
    with pytest.raises(ValueError, match="tail"):
        read_footer(data, len(data) - 1, "seg")


def test_segment_damage_to_one_block_spares_the_others() -> None:
    data = encode_segment(many(1200))
    footer = read_footer(data, len(data), "seg")
    for i, info in enumerate(footer.blocks):
        damaged = bytearray(data)
        damaged[info.offset + info.length // 2] ^= 0x10
        _, blocks = decode_segment(bytes(damaged), "db/seg-1")
        assert [isinstance(b, CorruptObject) for b in blocks] == [j == i for j in range(3)]
        assert str(blocks[i]) == f"db/seg-1: block at offset {info.offset}: checksum mismatch"
        with pytest.raises(CorruptObject, match=f"^db/seg-1: block at offset {info.offset}"):
            decode_block(bytes(damaged[info.offset : info.offset + info.length]), info, "db/seg-1")


def test_segment_detects_every_single_byte_flip() -> None:
    data = encode_segment([record(key=b"a"), record(key=b"b", payload=b"")], block_records=1)
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        try:
            _, blocks = decode_segment(bytes(damaged), "obj")
        except CorruptObject as exc:
            assert str(exc).startswith("obj: ")
        else:
            assert any(isinstance(b, CorruptObject) for b in blocks), f"byte {i}"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda n, ix: ix + 2, "index checksum mismatch"),  # the block count
        (lambda n, ix: n - 50, "index checksum mismatch"),  # the index digest in the trailer
        (lambda n, ix: n - 2, "bad trailer magic"),
        (lambda n, ix: n - 80, "out of range"),  # the high byte of index_offset
        (lambda n, ix: n - 70, "out of range"),  # index_length
        (lambda n, ix: n - 5, "object checksum mismatch"),  # the object digest itself
        (lambda n, ix: 10, "object checksum mismatch"),  # a reserved header byte
        (lambda n, ix: 0, "bad magic"),
        (lambda n, ix: 4, "unsupported format version 3"),
        (lambda n, ix: 5, "not a segment"),
    ],
    ids=[
        "index",
        "index-digest",
        "trailer-magic",
        "index-offset",
        "index-length",
        "object-digest",
        "reserved",
        "magic",
        "version",
        "kind",
    ],
)
def test_segment_damage_outside_the_blocks_is_named(
    where: Callable[[int, int], int], message: str
) -> None:
    data = encode_segment(many(10))
    index_offset = read_footer(data, len(data), "seg").index_offset
    damaged = bytearray(data)
    damaged[where(len(data), index_offset)] ^= 0x01
    with pytest.raises(CorruptObject, match=f"^backups/segments/x.seg: .*{message}"):
        decode_segment(bytes(damaged), "backups/segments/x.seg")


def test_segment_detects_truncation_at_every_point() -> None:
    data = encode_segment(many(3))
    for cut in range(len(data)):
        with pytest.raises(CorruptObject, match=r"^cut: "):
            decode_segment(data[:cut], "cut")
    for cut in (1, 4, 80, 100):
        with pytest.raises(CorruptObject, match=r"^cut: "):
            read_footer(data[:-cut][-TAIL_READ:], len(data) - cut, "cut")


@pytest.mark.parametrize("size", [0, 5, 99, 100, 101, 200, 4096])
def test_segment_rejects_garbage(size: int) -> None:
    with pytest.raises(CorruptObject, match="junk"):
        decode_segment(os.urandom(size), "junk")
    header = MAGIC + bytes([SEGMENT_VERSION, 0x53]) + bytes(10)
    with pytest.raises(CorruptObject, match="junk"):
        decode_segment(header + os.urandom(size), "junk")
    assert not is_segment(os.urandom(size)[:3])


def test_segment_and_format_1_objects_tell_each_other_apart() -> None:
    v1 = encode(record())
    seg = encode_segment([record()])
    assert not is_segment(v1)
    assert is_segment(seg)
    assert not is_segment(seg[:4] + b"\x02\x00" + seg[6:])
    with pytest.raises(CorruptObject, match="unsupported format version 1"):
        decode_segment(v1 + bytes(100), "v1")
    with pytest.raises(CorruptObject, match="unsupported format version 2"):
        decode(seg, "seg")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"offset": 17}, "block 0 in the index starts at 17, expected 16"),
        ({"count": 0}, "block 0 in the index is empty"),
        ({"first": (3, b"zzz")}, "block 0 in the index has its first key after its last"),
        ({"min_stamp": 2**64 - 1}, "block 0 in the index has a minimum above its maximum"),
        ({"min_read_at_us": 2**64 - 1}, "block 0 in the index has a minimum above"),
        ({"last": (9, b"z")}, "block 1 in the index is out of key order"),
        ({"length": 1}, "block 1 in the index starts at"),
    ],
)
def test_segment_rejects_an_index_that_contradicts_itself(
    changes: dict[str, object], message: str
) -> None:
    damaged = reindexed(encode_segment(many(10), block_records=5), **changes)
    with pytest.raises(CorruptObject, match=f"^seg: {message}"):
        read_footer(damaged, len(damaged), "seg")


def test_segment_rejects_an_index_with_bytes_left_over_or_a_gap() -> None:
    data = encode_segment(many(10), block_records=5)
    footer = read_footer(data, len(data), "orig")
    body = data[16 : footer.index_offset]
    with pytest.raises(CorruptObject, match="blocks end at"):
        damaged = assemble(body + b"gap", list(footer.blocks))
        read_footer(damaged, len(damaged), "seg")
    index = struct.pack(">I", 2) + b"".join(map(entry, footer.blocks)) + b"x"
    head = data[:16] + body + index + struct.pack(">QI", footer.index_offset, len(index))
    head += sha(index)
    damaged = head + sha(head) + b"RRB2"
    with pytest.raises(CorruptObject, match="1 bytes left over"):
        decode_segment(damaged, "seg")
    index = struct.pack(">I", 3) + b"".join(map(entry, footer.blocks))
    head = data[:16] + body + index + struct.pack(">QI", footer.index_offset, len(index))
    head += sha(index)
    with pytest.raises(CorruptObject, match="malformed index"):
        decode_segment(head + sha(head) + b"RRB2", "seg")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"count": 4}, "records do not fill"),
        ({"count": 6}, "malformed record"),
        ({"raw_length": 99}, "frame holds"),
        ({"first": (3, b"user:000000\x00")}, "first or last key differs"),
        ({"checksum": bytes(32)}, "checksum mismatch"),
    ],
)
def test_segment_block_must_agree_with_its_index_entry(
    changes: dict[str, object], message: str
) -> None:
    data = encode_segment(many(10), block_records=5)
    damaged = reindexed(data, **changes)
    _, blocks = decode_segment(damaged, "seg")
    assert isinstance(blocks[0], CorruptObject)
    assert str(blocks[0]).startswith(f"seg: block at offset 16: {message}")
    assert isinstance(blocks[1], list)


def test_decode_block_refuses_bytes_of_the_wrong_length() -> None:
    data = encode_segment([record()])
    (info,) = read_footer(data, len(data), "seg").blocks
    with pytest.raises(CorruptObject, match=r"^seg: block at offset 16: .* the index says"):
        decode_block(data[16 : 16 + info.length + 1], info, "seg")


def test_decode_block_checks_the_records_fill_the_block() -> None:
    # A frame that passes every checksum but whose records end early or run over.
    for raw_tail in (b"extra", b""):
        good = encode_segment([record()])
        (info,) = read_footer(good, len(good), "seg").blocks
        raw = zstandard.ZstdDecompressor().decompress(good[16 : 16 + info.length])
        raw = raw + raw_tail if raw_tail else raw[:-1]
        block = zstandard.ZstdCompressor().compress(raw)
        fake = dataclasses.replace(
            info, length=len(block), raw_length=len(raw), checksum=sha(block)
        )
        with pytest.raises(CorruptObject, match=r"^seg: block at offset 16: "):
            decode_block(block, fake, "seg")


def test_segment_names_round_trip_and_sort_by_time() -> None:
    name = segment_name("backups/", 0, 1_700_000_000_000_001, 1_700_000_000_000_900, UID)
    assert name == "backups/segments/0/01700000000000001-01700000000000900-0123456789abcdef.seg"
    assert check_name(name) == name
    assert name.startswith(segments_prefix("backups/", 0))
    assert name.startswith(segments_prefix("backups/"))
    assert segments_prefix("", 2) == SEGMENTS_DIR + "2/"
    parsed = parse_segment_name(name, "backups/")
    assert parsed == SegmentName(0, 1_700_000_000_000_001, 1_700_000_000_000_900, UID)
    rng = random.Random(3)
    stamps = sorted(rng.randrange(10**17 - 10) for _ in range(200))
    names = [segment_name("", 1, s, s + rng.randrange(10), new_uid()) for s in stamps]
    assert sorted(names) == names  # string order is time order
    assert [parse_segment_name(n) for n in names] == [
        SegmentName(1, s, int(n[29:46]), n[47:63]) for s, n in zip(stamps, names, strict=True)
    ]
    uids = {new_uid() for _ in range(1000)}
    assert len(uids) == 1000
    assert all(parse_segment_name(segment_name("", 12, 0, 0, u)) for u in uids)
    assert parse_segment_name(segment_name("", 12, 0, 0, UID)) == SegmentName(12, 0, 0, UID)


@pytest.mark.parametrize(
    "name",
    [
        latest_name("", 0, b"k"),
        version_name("", 0, b"k", 1_700_000_000_000_001, tombstone=False),
        "segments/0/1700000000000001-01700000000000900-0123456789abcdef.seg",  # 16 digits
        "segments/0/001700000000000001-01700000000000900-0123456789abcdef.seg",  # 18 digits
        "segments/0/01700000000000001-01700000000000900-0123456789abcdef.seg\n",
        "segments/0/01700000000000001-01700000000000900-0123456789ABCDEF.seg",
        "segments/0/01700000000000001-01700000000000900-0123456789abcde.seg",
        "segments/0/01700000000000001-01700000000000900-0123456789abcdef.seg.tmp",
        "segments/0/01700000000000001-01700000000000900-0123456789abcdef",
        "segments/01/01700000000000001-01700000000000900-0123456789abcdef.seg",
        "segments/-1/01700000000000001-01700000000000900-0123456789abcdef.seg",
        "segments/0/x/01700000000000001-01700000000000900-0123456789abcdef.seg",
        "segments/0/01700000000000900-01700000000000001-0123456789abcdef.seg",  # min > max
        "segments/0/0170000000000000\u0661-01700000000000900-0123456789abcdef.seg",
        "other/segments/0/01700000000000001-01700000000000900-0123456789abcdef.seg",
        "",
    ],
)
def test_segment_name_parse_rejects_foreign_names(name: str) -> None:
    assert parse_segment_name(name) is None


def test_segment_name_parse_respects_the_prefix() -> None:
    name = segment_name("a/", 0, 1, 2, UID)
    assert parse_segment_name(name, "a/") == SegmentName(0, 1, 2, UID)
    assert parse_segment_name(name, "b/") is None
    assert parse_segment_name(name) is None
    assert parse_segment_name(name, "a") is None


@pytest.mark.parametrize(
    ("level", "low", "high", "uid"),
    [(-1, 0, 0, UID), (0, 5, 4, UID), (0, 0, 10**17, UID), (0, -1, 0, UID), (0, 0, 0, "ABC")],
)
def test_segment_name_refuses_values_that_would_not_parse_back(
    level: int, low: int, high: int, uid: str
) -> None:
    with pytest.raises(ValueError, match="segment"):
        segment_name("", level, low, high, uid)


def test_newer_compares_stamps_then_read_times() -> None:
    old = record(stamp=10, read_at_us=900)
    new = record(stamp=11, read_at_us=100)  # a later lease, read on a slower clock
    assert newer(new, old) and not newer(old, new)
    tie = record(stamp=10, read_at_us=901)
    assert newer(tie, old) and not newer(old, tie)
    assert not newer(old, record(stamp=10, read_at_us=900))
    v1 = record(stamp=0, read_at_us=5), record(stamp=0, read_at_us=6)
    assert newer(v1[1], v1[0])
