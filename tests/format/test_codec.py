"""The object format: round trips, and every kind of damage is detected."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from rrb_streams.errors import CorruptObject
from rrb_streams.format.codec import (
    FORMAT_VERSION,
    MAGIC,
    KeyRecord,
    decode,
    encode,
    is_ours,
)


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
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def resealed(body: bytes) -> bytes:
    """``body`` with a valid checksum, to reach the checks behind the checksum."""
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    "rec",
    [
        record(),
        record(key=b""),
        record(key=b"\x00"),
        record(key=bytes(range(256))),
        record(key=os.urandom(10 * 1024)),
        record(payload=b""),
        record(payload=os.urandom(3 * 1024 * 1024)),
        record(expire_at_ms=None),
        record(expire_at_ms=0),
        record(db=0),
        record(db=2**32 - 1),
        record(read_at_us=0, entry_id="", redis_version=""),
        record(read_at_us=2**64 - 1, type="x" * 255),
        record(type="stream"),
        KeyRecord.absent(b"\xffgone\x00", 15, 1_700_000_000_000_002, "1-1", "7.0.15"),
    ],
    ids=[
        "plain",
        "empty-key",
        "nul-key",
        "binary-key",
        "10KB-key",
        "empty-payload",
        "3MB-payload",
        "persistent",
        "expire-0",
        "db0",
        "db-max",
        "empty-strings",
        "max-read-time",
        "stream",
        "tombstone",
    ],
)
def test_codec_round_trips(rec: KeyRecord) -> None:
    data = encode(rec)
    assert is_ours(data)
    assert decode(data, "obj") == rec


def test_codec_tombstone_has_no_payload_and_type_none() -> None:
    rec = decode(encode(KeyRecord.absent(b"k", 0, 5, "1-0", "7.0.15")))
    assert rec.tombstone
    assert rec.type == "none"
    assert rec.payload == b""
    assert rec.expire_at_ms is None


def test_codec_layout_matches_the_documented_header() -> None:
    data = encode(record(key=b"KEY", payload=b"PAY", expire_at_ms=None))
    assert data[:4] == MAGIC == b"\x89RRB"
    assert data[4] == FORMAT_VERSION == 1
    assert data[5] == 0
    assert struct.unpack(">I", data[6:10]) == (3,)
    assert struct.unpack(">q", data[10:18]) == (-1,)
    assert struct.unpack(">Q", data[18:26]) == (1_700_000_000_000_001,)
    assert data[26:33] == b"\x06string"
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    assert data[-32 - 3 - 8 : -32] == struct.pack(">Q", 3) + b"PAY"
    assert encode(KeyRecord.absent(b"k", 0, 5, "", ""))[5] == 1


def test_codec_detects_truncation_at_every_point() -> None:
    data = encode(record(key=b"key", payload=b"payload bytes"))
    for cut in range(len(data)):
        with pytest.raises(CorruptObject, match=r"^db0/x: "):
            decode(data[:cut], "db0/x")


def test_codec_detects_truncation_of_a_large_object() -> None:
    data = encode(record(payload=os.urandom(1 << 20)))
    for cut in (0, 3, 4, 25, 26, 100, len(data) // 2, len(data) - 33, len(data) - 32, -1):
        with pytest.raises(CorruptObject, match="big"):
            decode(data[:cut], "big")


def test_codec_detects_every_single_bit_flip() -> None:
    data = encode(record(key=b"k", payload=b"v"))
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(CorruptObject, match="obj"):
                decode(bytes(damaged), "obj")


@pytest.mark.parametrize("size", [0, 1, 72, 73, 74, 200, 4096])
def test_codec_rejects_garbage(size: int) -> None:
    garbage = os.urandom(size)
    with pytest.raises(CorruptObject, match="junk"):
        decode(garbage, "junk")
    with pytest.raises(CorruptObject, match="junk"):
        decode(MAGIC + bytes([FORMAT_VERSION]) + garbage, "junk")


def test_codec_rejects_wrong_magic_even_with_a_valid_checksum() -> None:
    body = encode(record())[:-32]
    with pytest.raises(CorruptObject, match="bad magic"):
        decode(resealed(b"\x89RRC" + body[4:]), "obj")
    assert not is_ours(b"\x89RRC" + body[4:])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_codec_rejects_other_format_versions(version: int) -> None:
    body = encode(record())[:-32]
    with pytest.raises(CorruptObject, match=f"unsupported format version {version}"):
        decode(resealed(body[:4] + bytes([version]) + body[5:]), "obj")


def test_codec_rejects_trailing_bytes() -> None:
    data = encode(record())
    with pytest.raises(CorruptObject, match="checksum"):
        decode(data + b"\x00", "obj")
    with pytest.raises(CorruptObject, match="lengths do not match"):
        decode(resealed(data[:-32] + b"extra"), "obj")


def test_codec_rejects_lengths_that_disagree_with_the_size() -> None:
    body = bytearray(encode(record(key=b"abc", payload=b"xyz"))[:-32])
    key_len_at = 26 + 7 + 16 + 7  # fixed header, then three short strings
    assert body[key_len_at : key_len_at + 4] == struct.pack(">I", 3)
    for bad in (0, 2, 4, 2**32 - 1):
        damaged = bytearray(body)
        damaged[key_len_at : key_len_at + 4] = struct.pack(">I", bad)
        with pytest.raises(CorruptObject, match="obj"):
            decode(resealed(bytes(damaged)), "obj")
    damaged = bytearray(body)
    damaged[-3 - 8 : -3] = struct.pack(">Q", 2**64 - 1)
    with pytest.raises(CorruptObject, match="lengths do not match"):
        decode(resealed(bytes(damaged)), "obj")


def test_codec_rejects_non_ascii_header_strings() -> None:
    body = bytearray(encode(record(type="string"))[:-32])
    body[27] = 0xFF  # first byte of the type string
    with pytest.raises(CorruptObject, match="malformed header"):
        decode(resealed(bytes(body)), "obj")


def test_codec_refuses_to_encode_overlong_header_strings() -> None:
    with pytest.raises(ValueError, match="entry_id"):
        encode(record(entry_id="1" * 256))
