"""Large records: a segment of one record made and sent a chunk at a time, and a large block
fetched and decompressed a piece at a time.

A value of hundreds of megabytes cannot be copied freely: :func:`encode_segment` would hold
it three times (the record, the block before and after compression). Here the value is
compressed slice by slice into one zstd frame, and the checksums follow the chunks, so
memory holds the record and one chunk. The object is an ordinary segment (docs/FORMAT.md):
one block of one record. Reading such a block back, :func:`read_large_block` fetches it in
ranged pieces, checks and decompresses each as it comes, and holds the raw block once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import anyio
import zstandard

from rrb_streams.errors import CorruptObject
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.segment import (
    HEADER,
    HEADER_SIZE,
    TRAILER_MAGIC,
    BlockInfo,
    footer_bytes,
    parse_block,
    record_parts,
)
from rrb_streams.storage.base import Storage

#: Blocks of at least this many raw bytes are read with :func:`read_large_block`.
LARGE_BLOCK = 16 * 1024 * 1024
_PIECE = 8 * 1024 * 1024  # compressed bytes one ranged GET of a large block fetches


def encode_segment_stream(
    rec: KeyRecord, *, level: int = 3, chunk_bytes: int = 1 << 20
) -> Iterator[bytes]:
    """A segment of the one record ``rec``, as chunks of about ``chunk_bytes``: for a value
    too large to hold twice. The payload is compressed slice by slice, so memory holds
    ``rec`` and one chunk, never a second copy of the value; checksums are computed as the
    chunks go. The object reads like any :func:`encode_segment` output.

    Raises ``ValueError`` when the record does not fit the format (before any chunk).
    """
    parts = record_parts(rec)
    head = b"".join(parts[:-1])
    raw_length = len(head) + len(rec.payload)
    if raw_length > 0xFFFFFFFF:
        raise ValueError(f"a record of {raw_length} bytes does not fit a block")
    return _stream_segment(rec, head, raw_length, level, chunk_bytes)


def _stream_segment(
    rec: KeyRecord, head: bytes, raw_length: int, level: int, chunk_bytes: int
) -> Iterator[bytes]:
    whole = hashlib.sha256()
    block = hashlib.sha256()
    header = HEADER
    whole.update(header)
    yield header
    # The frame carries its content size, as one-shot compress() writes it: readers check it.
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=raw_length)
    payload = memoryview(rec.payload)

    def compressed() -> Iterator[bytes]:
        yield compressor.compress(head)
        for i in range(0, len(payload), chunk_bytes):
            yield compressor.compress(payload[i : i + chunk_bytes])
        yield compressor.flush()

    length = 0
    for chunk in _coalesce(compressed(), chunk_bytes):
        block.update(chunk)
        whole.update(chunk)
        length += len(chunk)
        yield chunk
    info = BlockInfo(
        offset=HEADER_SIZE,
        length=length,
        raw_length=raw_length,
        count=1,
        first=(rec.db, rec.key),
        last=(rec.db, rec.key),
        min_read_at_us=rec.read_at_us,
        max_read_at_us=rec.read_at_us,
        min_stamp=rec.stamp,
        max_stamp=rec.stamp,
        checksum=block.digest(),
    )
    index, trailer_head = footer_bytes([info], HEADER_SIZE + length)
    whole.update(index)
    whole.update(trailer_head)
    yield index + trailer_head + whole.digest() + TRAILER_MAGIC


def _coalesce(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``pieces`` joined into chunks of at least ``size`` bytes (the last may be shorter)."""
    pending: list[bytes] = []
    pending_size = 0
    for piece in pieces:
        if piece:
            pending.append(piece)
            pending_size += len(piece)
        if pending_size >= size:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


async def read_large_block(
    storage: Storage, name: str, info: BlockInfo, *, piece: int = _PIECE
) -> list[KeyRecord]:
    """The records of one block, fetched ``piece`` compressed bytes at a time: the block's
    checksum and decompression follow the pieces, so memory holds one piece, the raw block
    and, while it is parsed, its records.

    Raises ``CorruptObject`` as :func:`~rrb_streams.format.segment.decode_block` does,
    ``ObjectNotFound`` when the object is gone, and the storage's errors.
    """
    where = f"{name}: block at offset {info.offset}"
    checksum = hashlib.sha256()
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    # The raw block is written into one buffer sized by the index, not gathered as a list of
    # pieces: freed pieces would stay in the allocator's heap, and the process would keep
    # that memory for good.
    raw = bytearray(info.raw_length)
    raw_size = 0
    fetched = 0

    def take(data: bytes) -> None:
        nonlocal raw_size
        checksum.update(data)
        try:
            out = decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"{where}: cannot decompress: {exc}") from exc
        if raw_size + len(out) > info.raw_length:
            raise CorruptObject(f"{where}: more than the {info.raw_length} raw bytes it holds")
        raw[raw_size : raw_size + len(out)] = out
        raw_size += len(out)

    while fetched < info.length:
        want = min(piece, info.length - fetched)
        data = await storage.get_range(name, info.offset + fetched, want)
        if not data:
            break  # the object is shorter than its index says
        fetched += len(data)
        await anyio.to_thread.run_sync(take, data)
    if fetched != info.length:
        raise CorruptObject(f"{where}: {fetched} bytes, the index says {info.length}")
    if checksum.digest() != info.checksum:
        raise CorruptObject(f"{where}: checksum mismatch")
    if not decompressor.eof or raw_size != info.raw_length:
        raise CorruptObject(f"{where}: the compressed frame is cut short")

    def parse() -> list[KeyRecord]:
        nonlocal raw
        whole = bytes(raw)
        raw = bytearray()  # two copies at most: the buffer goes before parsing copies again
        return parse_block(whole, info, name)

    return await anyio.to_thread.run_sync(parse)
