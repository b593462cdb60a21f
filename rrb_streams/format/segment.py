"""The segment object, format version 2: the records of many keys in one object.

All integers are big-endian and unsigned unless marked::

    header   16  magic b"\\x89RRB", version u8 = 2, kind u8 = 0x53 ('S'), 10 reserved bytes (0)
    blocks       each a zstd frame of concatenated records (below), laid end to end from 16
    index        u32 block count, then per block:
                   offset u64 (from the object start), length u32 (compressed bytes),
                   raw_length u32, count u32 (records),
                   first: db u32, key length u32, key;  last: db u32, key length u32, key,
                   min_read_at_us u64, max_read_at_us u64, min_stamp u64, max_stamp u64,
                   sha256 of the block's compressed bytes (32)
    trailer  80  index_offset u64, index_length u32, sha256 of the index (32),
                 sha256 of every byte before this field (32), magic b"RRB2"

    record   db u32, key length u32, key, flags u8 (bit 0: tombstone),
             expire_at_ms i64 (signed, -1 = none), read_at_us u64, stamp u64,
             type, entry_id, redis_version (each u8 length + ASCII), payload length u64, payload

Records are sorted by (db, key, stamp, read_at_us) over the whole object, then cut into
blocks: a block closes at ``block_records`` records or ``block_bytes`` raw bytes, and never
holds more than ``block_bytes`` unless it is a single record. Blocks are therefore in key
order; one key's records may straddle a block boundary, so a block's ``last`` may equal the
next block's ``first``.

A reader fetches the object's last :data:`TAIL_READ` bytes, parses the footer with
:func:`read_footer` (which asks for more with :class:`NeedMore` when the index is longer),
then fetches and decodes only the blocks whose key or stamp range it needs. Every block is
verified by its own checksum, so ranged reads never need the whole object. :func:`decode_segment`
reads a whole object and also checks the object checksum; its rules for partial damage are in
its docstring. Any damage raises (or yields) ``CorruptObject`` naming the object.

Names are ``{prefix}segments/{level}/{min_stamp:017d}-{max_stamp:017d}-{uid}.seg``: they sort
by time within a level, a random ``uid`` keeps writers from colliding, and no key name shows.
"""

from __future__ import annotations

import hashlib
import operator
import re
import secrets
import struct
from dataclasses import dataclass

import zstandard

from rrb_streams.errors import CorruptObject
from rrb_streams.format.codec import FLAG_TOMBSTONE, MAGIC, NO_EXPIRY, KeyRecord

SEGMENT_VERSION = 2
KIND = 0x53  # 'S': the byte a v1 object uses for flags, which are only ever 0 or 1 there
TRAILER_MAGIC = b"RRB2"
HEADER_SIZE = 16
TRAILER_SIZE = 80
TAIL_READ = 64 * 1024  # bytes a reader fetches from the end first: trailer + index usually fit

_HEADER = struct.Struct(">4sBB10x")
HEADER = _HEADER.pack(MAGIC, SEGMENT_VERSION, KIND)  # every segment starts with these bytes
_TRAILER = struct.Struct(">QI32s32s4s")
_TRAILER_HEAD = struct.Struct(">QI32s")  # the trailer fields the object checksum covers
_DIGEST_SIZE = 32
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# Index entry: offset, length, raw_length, count, first db, first key length | key |
# last db, last key length | key | read and stamp ranges, block sha256.
_ENTRY_HEAD = struct.Struct(">QIIIII")
_ENTRY_LAST = struct.Struct(">II")
_ENTRY_TAIL = struct.Struct(">QQQQ32s")
# Record: db, key length | key | flags, expire, read_at_us, stamp, type length | ...
_REC_HEAD = struct.Struct(">II")
_REC_MID = struct.Struct(">BqQQB")

assert _HEADER.size == HEADER_SIZE and _TRAILER.size == TRAILER_SIZE

_ORDER = operator.attrgetter("db", "key", "stamp", "read_at_us")


class NeedMore(Exception):  # not an RrbError: a request for more bytes, not a failure
    """The tail given to :func:`read_footer` does not reach the start of the index.

    ``needed`` is how many bytes from the end of the object the caller must fetch.
    """

    def __init__(self, needed: int) -> None:
        super().__init__(f"need the last {needed} bytes of the object")
        self.needed = needed


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One block's index entry: where it is, what it holds, and its checksum."""

    offset: int  # from the object start
    length: int  # compressed bytes
    raw_length: int  # bytes after decompression
    count: int  # records
    first: tuple[int, bytes]  # (db, key) of the first record
    last: tuple[int, bytes]  # (db, key) of the last record
    min_read_at_us: int
    max_read_at_us: int
    min_stamp: int
    max_stamp: int
    checksum: bytes  # sha256 of the compressed bytes


@dataclass(frozen=True, slots=True)
class Footer:
    """A segment's block index, as :func:`read_footer` verified it."""

    blocks: tuple[BlockInfo, ...]
    index_offset: int

    @property
    def records(self) -> int:
        return sum(b.count for b in self.blocks)

    @property
    def min_stamp(self) -> int:
        return min((b.min_stamp for b in self.blocks), default=0)

    @property
    def max_stamp(self) -> int:
        return max((b.max_stamp for b in self.blocks), default=0)

    @property
    def min_read_at_us(self) -> int:
        return min((b.min_read_at_us for b in self.blocks), default=0)

    @property
    def max_read_at_us(self) -> int:
        return max((b.max_read_at_us for b in self.blocks), default=0)


def newer(a: KeyRecord, b: KeyRecord) -> bool:
    """Whether ``a`` is a later read than ``b`` of the same key (the caller's precondition).

    The stamp decides; the source clock only breaks ties between equal stamps (format 1
    records, which all have stamp 0).
    """
    return (a.stamp, a.read_at_us) > (b.stamp, b.read_at_us)


# --- writing -------------------------------------------------------------------------------


def _short(value: str, field: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) > 255:
        raise ValueError(f"{field} longer than 255 bytes")
    return bytes((len(raw),)) + raw


def record_parts(rec: KeyRecord) -> list[bytes]:
    expire = NO_EXPIRY if rec.expire_at_ms is None else rec.expire_at_ms
    try:
        return [
            _REC_HEAD.pack(rec.db, len(rec.key)),
            rec.key,
            struct.pack(
                ">BqQQ",
                FLAG_TOMBSTONE if rec.tombstone else 0,
                expire,
                rec.read_at_us,
                rec.stamp,
            ),
            _short(rec.type, "type"),
            _short(rec.entry_id, "entry_id"),
            _short(rec.redis_version, "redis_version"),
            _U64.pack(len(rec.payload)),
            rec.payload,
        ]
    except struct.error as exc:  # a field out of its integer's range
        raise ValueError(f"record of db {rec.db} does not fit the format: {exc}") from exc


def _index_entry(info: BlockInfo) -> bytes:
    (first_db, first_key), (last_db, last_key) = info.first, info.last
    return b"".join(
        (
            _ENTRY_HEAD.pack(
                info.offset, info.length, info.raw_length, info.count, first_db, len(first_key)
            ),
            first_key,
            _ENTRY_LAST.pack(last_db, len(last_key)),
            last_key,
            _ENTRY_TAIL.pack(
                info.min_read_at_us,
                info.max_read_at_us,
                info.min_stamp,
                info.max_stamp,
                info.checksum,
            ),
        )
    )


def footer_bytes(infos: list[BlockInfo], index_offset: int) -> tuple[bytes, bytes]:
    """The index and the trailer's fields up to the object checksum."""
    index = _U32.pack(len(infos)) + b"".join(map(_index_entry, infos))
    return index, _TRAILER_HEAD.pack(index_offset, len(index), hashlib.sha256(index).digest())


# --- reading -------------------------------------------------------------------------------


def is_segment(data: bytes) -> bool:
    """Whether ``data`` starts with a segment header (cheap sniffing, no verification)."""
    return data[:4] == MAGIC and data[4:6] == bytes((SEGMENT_VERSION, KIND))


def read_footer(tail: bytes, object_size: int, name: str) -> Footer:
    """Verify and parse the trailer and index from the last ``len(tail)`` bytes of an object.

    Raises :class:`NeedMore` when the index starts before ``tail`` does, and
    ``CorruptObject`` naming ``name`` when the trailer or index is damaged.
    """
    if len(tail) > object_size:
        raise ValueError(f"{name}: a tail of {len(tail)} bytes from {object_size} bytes")
    if object_size < HEADER_SIZE + _U32.size + TRAILER_SIZE:
        raise CorruptObject(f"{name}: truncated ({object_size} bytes)")
    if len(tail) < TRAILER_SIZE:
        raise NeedMore(TRAILER_SIZE)
    view = memoryview(tail)
    index_offset, index_length, index_digest, _, magic = _TRAILER.unpack_from(
        view, len(view) - TRAILER_SIZE
    )
    if magic != TRAILER_MAGIC:
        raise CorruptObject(f"{name}: bad trailer magic (truncated, or not a segment)")
    # The index sits between the last block and the trailer, so its end is known exactly.
    if (
        index_offset < HEADER_SIZE
        or index_length < _U32.size
        or index_offset + index_length != object_size - TRAILER_SIZE
    ):
        raise CorruptObject(
            f"{name}: index at {index_offset} of {index_length} bytes is out of range"
        )
    needed = object_size - index_offset
    if needed > len(view):
        raise NeedMore(needed)
    index = view[len(view) - needed : len(view) - TRAILER_SIZE]
    if hashlib.sha256(index).digest() != index_digest:
        raise CorruptObject(f"{name}: index checksum mismatch")
    try:
        blocks = _parse_index(index, index_offset, name)
    except (struct.error, IndexError) as exc:
        raise CorruptObject(f"{name}: malformed index") from exc
    return Footer(blocks, index_offset)


def _parse_index(index: memoryview, index_offset: int, name: str) -> tuple[BlockInfo, ...]:
    (count,) = _U32.unpack_from(index, 0)
    pos = _U32.size
    blocks: list[BlockInfo] = []
    expected = HEADER_SIZE  # blocks are laid end to end from the header to the index
    for i in range(count):
        offset, length, raw_length, n, first_db, key_len = _ENTRY_HEAD.unpack_from(index, pos)
        pos += _ENTRY_HEAD.size
        first = (first_db, bytes(index[pos : pos + key_len]))
        pos += key_len
        last_db, key_len = _ENTRY_LAST.unpack_from(index, pos)
        pos += _ENTRY_LAST.size
        last = (last_db, bytes(index[pos : pos + key_len]))
        pos += key_len
        fields = _ENTRY_TAIL.unpack_from(index, pos)
        pos += _ENTRY_TAIL.size
        info = BlockInfo(offset, length, raw_length, n, first, last, *fields)
        problem = (
            f"starts at {offset}, expected {expected}"
            if offset != expected
            else "is empty"
            if not (length and raw_length and n)
            else "has its first key after its last"
            if first > last
            else "has a minimum above its maximum"
            if info.min_read_at_us > info.max_read_at_us or info.min_stamp > info.max_stamp
            else "is out of key order"
            if blocks and blocks[-1].last > first
            else None
        )
        if problem is not None:
            raise CorruptObject(f"{name}: block {i} in the index {problem}")
        blocks.append(info)
        expected += length
    if pos != len(index):
        raise CorruptObject(f"{name}: the index has {len(index) - pos} bytes left over")
    if expected != index_offset:
        raise CorruptObject(f"{name}: blocks end at {expected}, the index starts at {index_offset}")
    return tuple(blocks)


def decode_block(data: bytes, info: BlockInfo, name: str) -> list[KeyRecord]:
    """Verify, decompress and parse one block: exactly its ``info.length`` compressed bytes.

    Raises ``CorruptObject`` naming ``name`` and the block's offset on any mismatch.
    """
    where = f"{name}: block at offset {info.offset}"
    if len(data) != info.length:
        raise CorruptObject(f"{where}: {len(data)} bytes, the index says {info.length}")
    if hashlib.sha256(data).digest() != info.checksum:
        raise CorruptObject(f"{where}: checksum mismatch")
    try:
        # decompress() trusts the frame's own content size over max_output_size, so check it.
        size = zstandard.frame_content_size(data)
        if size != info.raw_length:
            raise CorruptObject(f"{where}: frame holds {size} bytes, index says {info.raw_length}")
        raw = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=info.raw_length, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptObject(f"{where}: cannot decompress: {exc}") from exc
    return parse_block(raw, info, name)


def parse_block(raw: bytes, info: BlockInfo, name: str) -> list[KeyRecord]:
    """Parse one block's decompressed bytes (verified by the caller against its checksum).

    Raises ``CorruptObject`` naming ``name`` and the block's offset on any mismatch.
    """
    where = f"{name}: block at offset {info.offset}"
    if len(raw) != info.raw_length:
        raise CorruptObject(f"{where}: {len(raw)} raw bytes, the index says {info.raw_length}")
    try:
        records = _parse_records(raw, info.count)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise CorruptObject(f"{where}: malformed record") from exc
    if records is None:
        raise CorruptObject(f"{where}: records do not fill the block's {info.raw_length} bytes")
    first, last = records[0], records[-1]
    if (first.db, first.key) != info.first or (last.db, last.key) != info.last:
        raise CorruptObject(f"{where}: first or last key differs from the index")
    return records


def _parse_records(raw: bytes, count: int) -> list[KeyRecord] | None:
    """``count`` records from ``raw``; ``None`` when they do not end exactly at its end."""
    # The hot loop of a restore: local names, one unpack per fixed run, slices of ``raw``
    # (each slice is the one copy the record needs anyway).
    head, mid, u64 = _REC_HEAD.unpack_from, _REC_MID.unpack_from, _U64.unpack_from
    record = KeyRecord
    out: list[KeyRecord] = []
    append = out.append
    # A block holds a handful of types and Redis versions: one string object each, not one
    # per record (a restore holds a range's records in memory at once).
    names: dict[bytes, str] = {}
    pos = 0
    for _ in range(count):
        db, n = head(raw, pos)
        pos += 8
        key = raw[pos : pos + n]
        pos += n
        flags, expire, read_at_us, stamp, n = mid(raw, pos)
        pos += 26
        text = raw[pos : pos + n]
        type_ = names.get(text) or names.setdefault(text, text.decode("ascii"))
        pos += n
        n = raw[pos]
        entry_id = raw[pos + 1 : pos + 1 + n].decode("ascii")
        pos += 1 + n
        n = raw[pos]
        text = raw[pos + 1 : pos + 1 + n]
        redis_version = names.get(text) or names.setdefault(text, text.decode("ascii"))
        pos += 1 + n
        (n,) = u64(raw, pos)
        pos += 8
        payload = raw[pos : pos + n]
        pos += n
        append(
            record(
                key,
                db,
                type_,
                None if expire == NO_EXPIRY else expire,
                read_at_us,
                entry_id,
                redis_version,
                payload,
                flags & FLAG_TOMBSTONE != 0,
                stamp,
            )
        )
    # A length that overran ``raw`` leaves ``pos`` past its end (the slice came back short).
    return out if pos == len(raw) else None


def decode_segment(data: bytes, name: str) -> tuple[Footer, list[list[KeyRecord] | CorruptObject]]:
    """Verify and decode a whole object: its footer and every block's records, in key order.

    Raises ``CorruptObject`` naming ``name`` when the header, trailer or index is damaged. A
    damaged block gives its ``CorruptObject`` in its place and the other blocks still decode,
    each verified by its own checksum. The object checksum covers every byte, including the
    few no other check does (the reserved header bytes, the object checksum itself): when it
    fails and no block does, the damage is outside the records and this raises too. A caller
    that wants to salvage such an object's records uses :func:`read_footer` and
    :func:`decode_block`, which never look at the object checksum.
    """
    if len(data) < HEADER_SIZE + _U32.size + TRAILER_SIZE:
        raise CorruptObject(f"{name}: truncated ({len(data)} bytes)")
    magic, version, kind = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptObject(f"{name}: not an rrb-streams object (bad magic)")
    if version != SEGMENT_VERSION:
        raise CorruptObject(f"{name}: unsupported format version {version} for a segment")
    if kind != KIND:
        raise CorruptObject(f"{name}: not a segment (kind {kind:#04x})")
    footer = read_footer(data, len(data), name)  # the whole object: never NeedMore
    digest_at = len(data) - TRAILER_SIZE + _TRAILER_HEAD.size
    intact = (
        hashlib.sha256(memoryview(data)[:digest_at]).digest()
        == data[digest_at : digest_at + _DIGEST_SIZE]
    )
    blocks: list[list[KeyRecord] | CorruptObject] = []
    for info in footer.blocks:
        try:
            blocks.append(decode_block(data[info.offset : info.offset + info.length], info, name))
        except CorruptObject as exc:
            blocks.append(exc)
    if not intact and not any(isinstance(b, CorruptObject) for b in blocks):
        raise CorruptObject(f"{name}: object checksum mismatch (header or trailer damaged)")
    return footer, blocks


# --- names ---------------------------------------------------------------------------------

SEGMENTS_DIR = "segments/"
_STAMP_LIMIT = 10**17  # 17 digits keep names in time order as strings
_UID = re.compile(r"[0-9a-f]{16}", re.ASCII)
_SEGMENT_NAME = re.compile(
    r"segments/(?P<level>0|[1-9][0-9]{0,8})/(?P<min>[0-9]{17})-(?P<max>[0-9]{17})"
    r"-(?P<uid>[0-9a-f]{16})\.seg",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class SegmentName:
    """What a segment's name says without fetching it."""

    level: int
    min_stamp: int
    max_stamp: int
    uid: str


def new_uid() -> str:
    """16 random lowercase hex digits: two writers never pick the same name."""
    return secrets.token_hex(8)


def segment_name(prefix: str, level: int, min_stamp: int, max_stamp: int, uid: str) -> str:
    """The name of a segment of ``level`` holding stamps ``min_stamp`` to ``max_stamp``."""
    if not 0 <= level < 10**9:
        raise ValueError(f"segment level {level} out of range")
    if not 0 <= min_stamp <= max_stamp < _STAMP_LIMIT:
        raise ValueError(f"segment stamps {min_stamp}..{max_stamp} out of range")
    if _UID.fullmatch(uid) is None:
        raise ValueError(f"segment uid {uid!r} is not 16 lowercase hex digits")
    return f"{prefix}{SEGMENTS_DIR}{level}/{min_stamp:017d}-{max_stamp:017d}-{uid}.seg"


def parse_segment_name(name: str, prefix: str = "") -> SegmentName | None:
    """Parse one of our segment names under ``prefix``; ``None`` when it is not one."""
    if not name.startswith(prefix):
        return None
    m = _SEGMENT_NAME.fullmatch(name, len(prefix))  # "$" would also accept a trailing "\n"
    if m is None:
        return None
    low, high = int(m["min"]), int(m["max"])
    if low > high:
        return None
    return SegmentName(int(m["level"]), low, high, m["uid"])


def segments_prefix(prefix: str, level: int | None = None) -> str:
    """The listing prefix of all segments, or of one level's (oldest first)."""
    return f"{prefix}{SEGMENTS_DIR}" if level is None else f"{prefix}{SEGMENTS_DIR}{level}/"
