"""Writing a segment one record at a time, for records that arrive already sorted.

:func:`encode_segment` sorts a batch and hands it to a :class:`SegmentBuilder`; compaction
feeds one the output of a merge, so an object of any size is built holding one block of
records and the compressed blocks, never the records as objects.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable

import zstandard

from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.segment import (
    HEADER,
    HEADER_SIZE,
    TRAILER_MAGIC,
    BlockInfo,
    footer_bytes,
    record_parts,
)

BLOCK_RECORDS = 500
BLOCK_BYTES = 256 * 1024

_ORDER = operator.attrgetter("db", "key", "stamp", "read_at_us")


def encode_segment(
    records: Iterable[KeyRecord],
    *,
    level: int = 3,
    block_records: int = BLOCK_RECORDS,
    block_bytes: int = BLOCK_BYTES,
) -> bytes:
    """Sort ``records``, cut them into blocks, and serialise the whole object.

    Raises ``ValueError`` when there are no records or a field does not fit the format.
    """
    builder = SegmentBuilder(level=level, block_records=block_records, block_bytes=block_bytes)
    for rec in sorted(records, key=_ORDER):
        builder.add(rec)
    return builder.finish()


class SegmentBuilder:
    """Blocks of records added in ``(db, key, stamp, read_at_us)`` order, then one object.

    Not thread-safe; one builder per object. :meth:`finish` raises ``ValueError`` when no
    record was added; :meth:`add` raises it when a field does not fit the format.
    """

    def __init__(
        self,
        *,
        level: int = 3,
        block_records: int = BLOCK_RECORDS,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        if block_records < 1 or block_bytes < 1:
            raise ValueError("block_records and block_bytes must be positive")
        # One compressor per builder: zstandard's objects are not safe to share between threads.
        self._compress = zstandard.ZstdCompressor(level=level).compress
        self._block_records = block_records
        self._block_bytes = block_bytes
        self._out: list[bytes] = [HEADER]
        self._infos: list[BlockInfo] = []
        self._offset = HEADER_SIZE
        self._members: list[KeyRecord] = []
        self._parts: list[bytes] = []
        self._size = 0
        self.records = 0

    @property
    def size(self) -> int:
        """Bytes of the object so far: compressed blocks, plus the open block's raw bytes."""
        return self._offset + self._size

    def add(self, rec: KeyRecord) -> None:
        rec_parts = record_parts(rec)
        rec_size = sum(map(len, rec_parts))
        if self._members and self._size + rec_size > self._block_bytes:
            self.close_block()  # keeps an oversized record out of a block of small ones
        self._members.append(rec)
        self._parts += rec_parts
        self._size += rec_size
        self.records += 1
        if len(self._members) >= self._block_records or self._size >= self._block_bytes:
            self.close_block()

    def finish(self) -> bytes:
        """The whole object. The builder is spent afterwards."""
        return b"".join(self.finish_pieces())

    def finish_pieces(self) -> list[bytes]:
        """The whole object as the pieces it is made of, for a streamed put that need not
        join them (a copy of the object). The builder is spent afterwards."""
        self.close_block()
        if not self._infos:
            raise ValueError("a segment needs at least one record")
        out, self._out = self._out, []
        out += footer_bytes(self._infos, self._offset)
        h = hashlib.sha256()
        for part in out:
            h.update(part)
        out += (h.digest(), TRAILER_MAGIC)
        return out

    @property
    def blocks(self) -> tuple[BlockInfo, ...]:
        """The blocks closed so far."""
        return tuple(self._infos)

    def close_block(self) -> None:
        """Compress the records added since the last block into one (none: nothing)."""
        members = self._members
        if not members:
            return
        raw = b"".join(self._parts)
        if len(raw) > 0xFFFFFFFF:
            raise ValueError(f"a record of {len(raw)} bytes does not fit a block")
        block = self._compress(raw)
        first, last = members[0], members[-1]
        self._infos.append(
            BlockInfo(
                offset=self._offset,
                length=len(block),
                raw_length=len(raw),
                count=len(members),
                first=(first.db, first.key),
                last=(last.db, last.key),
                min_read_at_us=min(r.read_at_us for r in members),
                max_read_at_us=max(r.read_at_us for r in members),
                min_stamp=min(r.stamp for r in members),
                max_stamp=max(r.stamp for r in members),
                checksum=hashlib.sha256(block).digest(),
            )
        )
        self._out.append(block)
        self._offset += len(block)
        self._members = []
        self._parts = []
        self._size = 0
