"""Large records: a streamed segment of one record reads like any segment, and a large block
read in pieces gives exactly what decoding it whole gives, or names its damage."""

from __future__ import annotations

import os

import pytest

from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.large import encode_segment_stream, read_large_block
from rrb_streams.format.segment import (
    HEADER_SIZE,
    decode_block,
    decode_segment,
    read_footer,
)
from rrb_streams.storage.memory import MemoryStorage
from tests.format.test_segment import record as segment_record

pytestmark = pytest.mark.anyio


def record(key: bytes = b"big", payload: bytes = b"", **changes: object) -> KeyRecord:
    return segment_record(key=key, payload=payload, **changes)


# Incompressible and compressible halves: the frame's pieces then vary in size.
PAYLOAD = os.urandom(600_000) + b"z" * 400_000


@pytest.mark.parametrize(
    "rec",
    [
        record(payload=PAYLOAD),
        record(payload=PAYLOAD, expire_at_ms=None, db=0, key=b"\x00\xffbin"),
        record(payload=b"", tombstone=True, type="none"),
        record(payload=b"x"),
    ],
    ids=["expiring", "persistent-binary-key", "tombstone", "one-byte"],
)
def test_a_streamed_segment_reads_like_any_segment(rec: KeyRecord) -> None:
    chunks = list(encode_segment_stream(rec, chunk_bytes=64 * 1024))
    data = b"".join(chunks)
    footer, blocks = decode_segment(data, "s")  # checks the object checksum too
    assert blocks == [[rec]]
    (info,) = footer.blocks
    assert info.offset == HEADER_SIZE
    assert (info.first, info.last, info.count) == ((rec.db, rec.key), (rec.db, rec.key), 1)
    assert (info.min_stamp, info.max_stamp) == (rec.stamp, rec.stamp)
    assert (info.min_read_at_us, info.max_read_at_us) == (rec.read_at_us, rec.read_at_us)
    assert read_footer(data, len(data), "s") == footer


def test_a_streamed_segment_comes_in_bounded_chunks() -> None:
    chunk = 64 * 1024
    chunks = list(encode_segment_stream(record(payload=PAYLOAD), chunk_bytes=chunk))
    assert len(chunks) >= 6
    # A chunk closes once it reaches ``chunk`` bytes; the compressed piece that took it there
    # holds at most a slice of the value or a zstd block (128 KiB), plus framing.
    assert max(map(len, chunks)) < chunk + max(chunk, 128 * 1024) + 1024


def test_a_record_that_does_not_fit_is_refused_before_any_chunk() -> None:
    with pytest.raises(ValueError, match="type longer than 255"):
        encode_segment_stream(record(type="t" * 300))


async def stored(data: bytes) -> MemoryStorage:
    storage = MemoryStorage()
    await storage.put("seg", data)
    return storage


@pytest.mark.parametrize("piece", [997, 4096, 10**9], ids=["997B", "4KiB", "whole"])
async def test_a_large_block_read_in_pieces_equals_the_block_decoded_whole(piece: int) -> None:
    records = [record(key=b"k%03d" % i, payload=os.urandom(3000)) for i in range(40)]
    data = encode_segment(records, block_records=100, block_bytes=1 << 30)
    footer = read_footer(data, len(data), "seg")
    (info,) = footer.blocks
    whole = decode_block(data[info.offset : info.offset + info.length], info, "seg")
    storage = await stored(data)
    assert await read_large_block(storage, "seg", info, piece=piece) == whole == records


async def test_a_streamed_segment_read_back_in_pieces() -> None:
    rec = record(payload=PAYLOAD)
    data = b"".join(encode_segment_stream(rec, chunk_bytes=50_000))
    (info,) = read_footer(data, len(data), "seg").blocks
    assert await read_large_block(await stored(data), "seg", info, piece=70_000) == [rec]


async def test_a_damaged_large_block_is_named() -> None:
    data = bytearray(b"".join(encode_segment_stream(record(payload=PAYLOAD))))
    (info,) = read_footer(bytes(data), len(data), "seg").blocks
    data[info.offset + info.length // 2] ^= 0xFF
    with pytest.raises(CorruptObject, match="seg: block at offset 16"):
        await read_large_block(await stored(bytes(data)), "seg", info, piece=100_000)


async def test_a_cut_short_large_block_is_named() -> None:
    data = b"".join(encode_segment_stream(record(payload=PAYLOAD)))
    (info,) = read_footer(data, len(data), "seg").blocks
    cut = data[: info.offset + info.length // 2]
    with pytest.raises(CorruptObject, match="bytes, the index says"):
        await read_large_block(await stored(cut), "seg", info, piece=100_000)


async def test_a_large_block_of_a_vanished_object_raises_not_found() -> None:
    data = b"".join(encode_segment_stream(record(payload=PAYLOAD)))
    (info,) = read_footer(data, len(data), "seg").blocks
    with pytest.raises(ObjectNotFound):
        await read_large_block(MemoryStorage(), "seg", info)
