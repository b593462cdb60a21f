"""The segment sink: the records of an uploader's batches, gathered into segment objects.

With ``--layout segments`` a batch does not write its keys one object each. It hands its
records to the process's one :class:`SegmentSink` and waits: :meth:`SegmentSink.write`
returns once a segment holding every one of them is durable (the PUT returned and
``storage.flush()`` returned after it), and raises when that segment could not be written.
Only then does the batch release its leases and acknowledge its entries.

A segment is written (:func:`rrb_streams.format.segment.encode_segment`, in a worker thread)
when the first of these comes:

- ``interval`` seconds after its first record arrived, so a change is durable within about
  ``interval`` plus one PUT;
- its records reach ``max_bytes``, so one segment stays a bounded size;
- every batch worker of the process is waiting on the sink: nothing more can arrive, and
  waiting out the interval would only idle the uploader (a backlog drains at full speed);
- right after such a segment, every worker that holds a batch is waiting on the sink, the
  others having found the stream empty: the end of a backlog is durable at once, not an
  interval later. This happens once per backlog, so a steady trickle of changes still gets
  one segment per interval.

PUTs per second therefore depend on the number of uploader processes and the interval, not
on the change rate.

**Bounded memory.** At most two segments exist: one being written and one gathering. A
writer whose records would overfill the gathering segment while the other is still being
written waits for it: that is the backpressure.

**Large values.** A record whose value holds :data:`STREAM_BYTES` or more is written as a
segment of its own, compressed chunk by chunk as it is sent (an S3 multipart upload; a file
written chunk by chunk): memory holds the value once, as read from the source, plus one part.

**Failure.** A segment that could not be written fails every writer waiting on it; each
batch retries its round, reading its keys again under new stamps. A record whose batch gave
up is still written if its segment is: harmless, since readers take each key's highest stamp.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from rrb_streams.backup.metrics import UploadMetrics, UploadStats
from rrb_streams.errors import ObjectRejected, StorageUnavailable
from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.large import encode_segment_stream
from rrb_streams.format.segment import new_uid, segment_name
from rrb_streams.storage.base import Storage

LEVEL = 0  # what uploaders write; compaction writes the levels above

#: A value at least this large is written as a segment of its own, streamed (see _put_one).
STREAM_BYTES = 16 * 1024 * 1024

# Bytes a record costs beyond its key and payload, for the size limit: its fixed fields.
_RECORD_OVERHEAD = 64


@dataclass(eq=False)
class _Segment:
    records: list[KeyRecord] = field(default_factory=list)
    size: int = 0
    opened_at: float = 0.0
    sealed: bool = False  # takes no more records
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


class SegmentSink:
    """One uploader process's segments. Run :meth:`run` in a task for as long as
    :meth:`write` may be called; ``workers`` is how many batch workers call it."""

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        *,
        interval: float,
        max_bytes: int,
        workers: int,
        call_timeout: float,
        stats: UploadStats,
        log: Any,
        metrics: UploadMetrics | None = None,
        stream_bytes: int = STREAM_BYTES,
    ) -> None:
        self._storage = storage
        self._stream_bytes = stream_bytes
        self._prefix = prefix
        self._interval = interval
        self._max_bytes = max_bytes
        self._workers = workers
        self._call_timeout = call_timeout
        self._stats = stats
        self._log = log
        self._metrics = metrics
        self._open = _Segment()
        self._waiting = 0  # writers waiting for their segments
        self._busy = 0  # batch workers holding a batch (see batch_started)
        self._draining = False  # the last segment went early: every worker waited on it
        self._changed = anyio.Event()
        self._stopped: Exception | None = None  # set once run() has ended: writes fail

    async def write(self, records: Sequence[KeyRecord]) -> None:
        """Return once every record is in a durable segment.

        Raises ``StorageUnavailable`` or ``ObjectRejected`` when a segment holding some of
        them failed: the caller reads those keys again and retries.
        """
        touched: list[_Segment] = []
        for rec in records:
            seg = self._open
            while seg.sealed:  # full, and the one before it still being written
                if self._stopped is not None:
                    raise self._stopped
                await self._next_change()
                seg = self._open
            if self._stopped is not None:
                raise self._stopped
            if not seg.records:
                seg.opened_at = anyio.current_time()
                self._notify()
            seg.records.append(rec)
            seg.size += len(rec.key) + len(rec.payload) + _RECORD_OVERHEAD
            if not touched or touched[-1] is not seg:
                touched.append(seg)
            if seg.size >= self._max_bytes:
                seg.sealed = True
                self._notify()
        if not touched:
            return
        self._waiting += 1
        self._notify()
        try:
            for seg in touched:
                await seg.done.wait()
        finally:
            self._waiting -= 1
        for seg in touched:
            if seg.error is not None:
                raise seg.error

    def batch_started(self) -> None:
        """A batch worker took a batch; :meth:`batch_ended` when it is done with it."""
        self._busy += 1

    def batch_ended(self) -> None:
        self._busy -= 1
        self._notify()

    def _everyone_waits(self) -> bool:
        if self._waiting >= self._workers:
            return True
        return self._draining and 0 < self._waiting >= self._busy

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write segments as they come due, until cancelled; then fail every writer still
        waiting, so none waits forever."""
        task_status.started()
        try:
            await self._run()
        finally:
            self._stopped = StorageUnavailable("the segment writer stopped")
            if not self._open.done.is_set():
                self._open.error = self._stopped
                self._open.done.set()
            self._notify()

    async def _run(self) -> None:
        while True:
            seg = self._open
            if not seg.records:
                await self._next_change()
                continue
            deadline = seg.opened_at + self._interval
            early = False
            while not seg.sealed:
                if self._everyone_waits():
                    early = True
                    break
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                with anyio.move_on_after(left):
                    await self._next_change()
            # A full segment or one every worker waited on means a backlog; the segment after
            # the one the busy workers alone waited on is back to the interval.
            self._draining = seg.sealed or (early and self._waiting >= self._workers)
            seg.sealed = True
            self._open = _Segment()
            self._notify()  # writers held back by a sealed segment may fill the new one
            await self._store(seg)

    async def _store(self, seg: _Segment) -> None:
        try:
            with anyio.fail_after(self._call_timeout):
                # A record too large to hold twice is a segment of its own, compressed and
                # sent as it is read: memory holds the value once, plus one part.
                large = [r for r in seg.records if len(r.payload) >= self._stream_bytes]
                # name, records, bytes of each object written
                written = [await self._put_one(rec) for rec in large]
                small = [r for r in seg.records if len(r.payload) < self._stream_bytes]
                if small:
                    data = await anyio.to_thread.run_sync(encode_segment, small)
                    stamps = [r.stamp for r in small]
                    name = segment_name(self._prefix, LEVEL, min(stamps), max(stamps), new_uid())
                    await self._storage.put(name, data)
                    written.append((name, len(small), len(data)))
                await self._storage.flush()
        except TimeoutError:
            seg.error = StorageUnavailable(f"segment write took over {self._call_timeout} s")
        except (StorageUnavailable, ObjectRejected, OSError) as exc:
            seg.error = exc
        except BaseException as exc:
            # Cancelled (the uploader is stopping) or a bug: the writers must not hang.
            seg.error = StorageUnavailable(f"segment write did not finish: {exc!r}")
            seg.done.set()
            raise
        else:
            s = self._stats
            for name, records, size in written:
                s.segments += 1
                s.segment_bytes += size
                self._log.debug("upload.segment_written", object=name, records=records, bytes=size)
            s.segment_records += len(seg.records)
            s.segment_raw_bytes += sum(
                len(r.key) + len(r.payload) + _RECORD_OVERHEAD for r in seg.records
            )
            if self._metrics is not None:
                self._metrics.segment_records.observe(len(seg.records))
        if seg.error is not None:
            self._log.warning(
                "upload.segment_failed", records=len(seg.records), error=str(seg.error)
            )
        seg.records = []  # the writers keep their own; free the memory now
        seg.done.set()

    async def _put_one(self, rec: KeyRecord) -> tuple[str, int, int]:
        """``rec`` alone, streamed through :func:`encode_segment_stream`: its object's name,
        records (one) and bytes."""
        size = 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in encode_segment_stream(rec):
                size += len(chunk)
                yield chunk

        name = segment_name(self._prefix, LEVEL, rec.stamp, rec.stamp, new_uid())
        await self._storage.put_stream(name, counted())
        return name, 1, size

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _next_change(self) -> None:
        await self._changed.wait()
