"""The object format, version 1. ``docs/FORMAT.md`` is the normative description.

One object holds one key's state at one read::

    magic            4  b"\\x89RRB"
    format version   1  1
    flags            1  bit 0: tombstone (the key was absent at the read)
    db               4  u32
    expire_at_ms     8  i64, absolute Unix ms on the source clock; -1 = no expiry
    read_at_us       8  u64, source clock (TIME) when the value was read
    type             1+n  u8 length, ASCII: string, list, set, zset, hash, stream, none, …
    entry_id         1+n  u8 length, ASCII: the change-stream entry that caused the read
    redis_version    1+n  u8 length, ASCII: the source's redis_version
    key              4+n  u32 length, raw bytes
    payload          8+n  u64 length, the DUMP bytes (empty for a tombstone)
    sha256          32  over every byte before it

All integers are big-endian. A reader rejects any other magic or version, a short object,
trailing bytes, or a checksum mismatch, with ``CorruptObject`` naming the object.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from rrb_streams.errors import CorruptObject

MAGIC = b"\x89RRB"
FORMAT_VERSION = 1
FLAG_TOMBSTONE = 0x01
NO_EXPIRY = -1

_FIXED = struct.Struct(">4sBBIqQ")
_DIGEST_SIZE = 32


@dataclass(slots=True)
class KeyRecord:
    """One key's state at one read of the source. Never changed once made.

    Not a frozen dataclass: building one costs eight times as much, and a restore builds one
    per record it decodes (hundreds of thousands a second).
    """

    key: bytes
    db: int
    type: str  # as TYPE reports it; "none" for a tombstone
    expire_at_ms: int | None  # absolute, source clock; None = persistent
    read_at_us: int  # source clock
    entry_id: str  # change-stream entry that caused this read ("" when none)
    redis_version: str
    payload: bytes  # DUMP output; b"" for a tombstone
    tombstone: bool = False
    #: The ordering stamp taken with the key's lease (segment layout; 0 in format 1 objects):
    #: of two reads of one key, the higher stamp is the later read, whatever the clocks said.
    stamp: int = 0

    @classmethod
    def absent(
        cls, key: bytes, db: int, read_at_us: int, entry_id: str, redis_version: str
    ) -> KeyRecord:
        """A tombstone: the key did not exist at ``read_at_us``."""
        return cls(key, db, "none", None, read_at_us, entry_id, redis_version, b"", True)


def _short(value: str, field: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) > 255:
        raise ValueError(f"{field} longer than 255 bytes")
    return bytes([len(raw)]) + raw


def encode(rec: KeyRecord) -> bytes:
    """Serialise a record, checksum included."""
    expire = NO_EXPIRY if rec.expire_at_ms is None else rec.expire_at_ms
    parts = [
        _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            FLAG_TOMBSTONE if rec.tombstone else 0,
            rec.db,
            expire,
            rec.read_at_us,
        ),
        _short(rec.type, "type"),
        _short(rec.entry_id, "entry_id"),
        _short(rec.redis_version, "redis_version"),
        struct.pack(">I", len(rec.key)),
        rec.key,
        struct.pack(">Q", len(rec.payload)),
        rec.payload,
    ]
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    parts.append(h.digest())
    return b"".join(parts)


def is_ours(data: bytes) -> bool:
    """Whether ``data`` starts with our magic (cheap sniffing, no verification)."""
    return data[:4] == MAGIC


def decode(data: bytes, name: str = "<object>") -> KeyRecord:
    """Verify and parse an object. Raises ``CorruptObject`` naming ``name`` on any damage."""
    view = memoryview(data)
    if len(view) < _FIXED.size + 3 + 4 + 8 + _DIGEST_SIZE:
        raise CorruptObject(f"{name}: truncated ({len(view)} bytes)")
    magic, version, flags, db, expire, read_at_us = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptObject(f"{name}: not an rrb-streams object (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptObject(f"{name}: unsupported format version {version}")
    body, digest = view[:-_DIGEST_SIZE], view[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptObject(f"{name}: checksum mismatch")
    try:
        pos = _FIXED.size
        fields: list[str] = []
        for _ in range(3):
            n = body[pos]
            fields.append(bytes(body[pos + 1 : pos + 1 + n]).decode("ascii"))
            pos += 1 + n
        (key_len,) = struct.unpack_from(">I", body, pos)
        pos += 4
        key = bytes(body[pos : pos + key_len])
        pos += key_len
        (payload_len,) = struct.unpack_from(">Q", body, pos)
        pos += 8
        payload = bytes(body[pos : pos + payload_len])
        pos += payload_len
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptObject(f"{name}: malformed header") from exc
    if len(key) != key_len or len(payload) != payload_len or pos != len(body):
        raise CorruptObject(f"{name}: lengths do not match the object size")
    return KeyRecord(
        key=key,
        db=db,
        type=fields[0],
        expire_at_ms=None if expire == NO_EXPIRY else expire,
        read_at_us=read_at_us,
        entry_id=fields[1],
        redis_version=fields[2],
        payload=payload,
        tombstone=bool(flags & FLAG_TOMBSTONE),
    )
