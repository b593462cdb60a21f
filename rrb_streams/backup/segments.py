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
  waiting out the interval would only idle the uploader (a backlog drains at full speed).

PUTs per second therefore depend on the number of uploader processes and the interval, not
on the change rate.

**Bounded memory.** At most two segments exist: one being written and one gathering. A
writer whose records would overfill the gathering segment while the other is still being
written waits for it: that is the backpressure.

**Failure.** A segment that could not be written fails every writer waiting on it; each
batch retries its round, reading its keys again under new stamps. A record whose batch gave
up is still written if its segment is: harmless, since readers take each key's highest stamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from rrb_streams.backup.metrics import UploadMetrics, UploadStats
from rrb_streams.errors import ObjectRejected, StorageUnavailable
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.segment import encode_segment, new_uid, segment_name
from rrb_streams.storage.base import Storage

LEVEL = 0  # what uploaders write; compaction writes the levels above

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
    ) -> None:
        self._storage = storage
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
            while not (seg.sealed or self._waiting >= self._workers):
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                with anyio.move_on_after(left):
                    await self._next_change()
            seg.sealed = True
            self._open = _Segment()
            self._notify()  # writers held back by a sealed segment may fill the new one
            await self._store(seg)

    async def _store(self, seg: _Segment) -> None:
        try:
            data = await anyio.to_thread.run_sync(encode_segment, seg.records)
            stamps = [r.stamp for r in seg.records]
            name = segment_name(self._prefix, LEVEL, min(stamps), max(stamps), new_uid())
            with anyio.fail_after(self._call_timeout):
                await self._storage.put(name, data)
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
            raw = sum(len(r.key) + len(r.payload) + _RECORD_OVERHEAD for r in seg.records)
            s = self._stats
            s.segments += 1
            s.segment_records += len(seg.records)
            s.segment_raw_bytes += raw
            s.segment_bytes += len(data)
            if self._metrics is not None:
                self._metrics.segment_records.observe(len(seg.records))
            self._log.debug(
                "upload.segment_written", object=name, records=len(seg.records), bytes=len(data)
            )
        if seg.error is not None:
            self._log.warning(
                "upload.segment_failed", records=len(seg.records), error=str(seg.error)
            )
        seg.records = []  # the writers keep their own; free the memory now
        seg.done.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _next_change(self) -> None:
        await self._changed.wait()
