"""rrb-upload: members of one consumer group that copy changed keys from the source to storage.

An uploader process runs:

- one **reader** task: ``XREADGROUP`` (``COUNT batch_size``, ``BLOCK`` up to 1 s); a short
  batch lingers up to ``linger`` seconds to fill, so a hot key's changes arrive together. Every
  ``claim_idle / 2`` it also ``XAUTOCLAIM``s entries idle for ``claim_idle``: those of consumers
  that died. Batches go through a memory object stream without a buffer to the batch workers
  (``concurrency`` of them, four times as many with segments: :attr:`Uploader.batch_workers`),
  so at most one batch more than there are workers is in memory;
- the **batch workers** (:mod:`rrb_streams.backup.batch`): leases, one source read per db,
  storage writes (with segments, through the process's one segment sink,
  :mod:`rrb_streams.backup.segments`; with keys, all workers share one limiter of
  ``concurrency`` storage calls), ``flush()``, lease release, then ``XACK``. Nothing is
  acknowledged before storage confirmed it;
- a **keep-alive** task that resets the idle time of every entry this process holds
  (``XCLAIM … JUSTID`` to itself), so while it waits out a storage outage, or a batch waits in
  the stream to the workers, live consumers do not claim its work;
- a **trim** task: :func:`rrb_streams.wire.group.trim` every ``trim_interval`` seconds.

**Last write wins per key.** Each key is read and written under a per-key lease on the stream
Redis, and read only after the lease is taken, so a later holder always stores a newer state. A
holder whose lease ran out during its write (its write may have landed after a newer one) reads
and writes the key again. Entries whose change a stored object already covers (the key's done
marker) are acknowledged without a read or a write, and keys whose fresh read has the digest
the stored-keys index holds (:mod:`rrb_streams.wire.index`) without a write. With segments
each record carries the ordering stamp of its lease and readers take the highest, so a late
write never hides a newer one. The keys layout's residual case is a storage write that the
server commits after the client gave up on it: nothing redoes it until the key changes again.
:mod:`rrb_streams.backup.lease` has the full argument.

:meth:`Uploader.stop` stops reading, lets the workers finish and acknowledge what they hold, and
returns. A consumer left with nothing pending is then deleted from the group, so restarts under
fresh names do not pile up dead consumers.
"""

from __future__ import annotations

from dataclasses import asdict

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from rrb_streams.backup.batch import CALL_TIMEOUT_LEASES, Batch, BatchProcessor
from rrb_streams.backup.lease import Leases
from rrb_streams.backup.metrics import UploadMetrics, UploadStats
from rrb_streams.backup.segments import SegmentSink
from rrb_streams.config import UploadConfig
from rrb_streams.errors import DependencyError
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.ops.timed import TimedStorage
from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.service import StopRequest
from rrb_streams.storage.base import Storage
from rrb_streams.wire.cluster_source import open_source
from rrb_streams.wire.connections import ping
from rrb_streams.wire.group import GroupReader, RawEntry, ensure_group, trim
from rrb_streams.wire.slot_client import connect_own
from rrb_streams.wire.urls import redact_url

MAX_BLOCK = 1.0  # seconds one XREADGROUP may block
SEGMENT_WORKERS = 4  # batch workers per --concurrency with the segments layout


class Uploader:
    """One uploader process: a member ``cfg.consumer`` of the group ``cfg.group``.

    ``storage`` belongs to the caller, who opens, checks and closes it.
    """

    def __init__(self, cfg: UploadConfig, storage: Storage, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.storage = storage
        self.stats = UploadStats()
        self._metrics = metrics
        if metrics is not None:
            metrics.part(UploadMetrics).track(self.stats)
        self._source = open_source(cfg.source_url, cluster=cfg.source_cluster, tls=cfg.tls)
        self._log = get_logger("upload", consumer=cfg.consumer, stream=cfg.own.stream)
        self._stopping = StopRequest()

    # Counters for tests and metrics; see UploadStats.
    @property
    def entries_acked(self) -> int:
        return self.stats.entries_acked

    @property
    def puts(self) -> int:
        return self.stats.puts

    @property
    def deletes(self) -> int:
        return self.stats.deletes

    @property
    def coalesced(self) -> int:
        return self.stats.coalesced

    @property
    def unchanged(self) -> int:
        return self.stats.unchanged

    @property
    def dead_lettered(self) -> int:
        return self.stats.dead_lettered

    @property
    def claimed(self) -> int:
        return self.stats.claimed

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop`; then finish and acknowledge in-flight batches, return.

        Raises ``DependencyError`` before ``task_status.started()`` when the source or the
        stream Redis cannot be reached; later outages are retried with capped backoff.
        """
        cfg = self.cfg
        r = connect_own(cfg.effective_stream_url, cfg.own, name="rrb-upload", tls=cfg.tls)
        reader = GroupReader(r, cfg.own.stream, cfg.group, cfg.consumer)
        try:
            await self._start(r)
            m = self._metrics
            storage = self.storage if m is None else TimedStorage(self.storage, m)
            workers = self.batch_workers
            sink = None
            if cfg.layout == "segments":
                sink = SegmentSink(
                    storage,
                    cfg.path_prefix,
                    interval=cfg.segment_interval,
                    max_bytes=cfg.segment_bytes,
                    workers=workers,
                    call_timeout=cfg.lease * CALL_TIMEOUT_LEASES,
                    stats=self.stats,
                    log=self._log,
                    metrics=None if m is None else m.part(UploadMetrics),
                )
            processor = BatchProcessor(
                cfg,
                storage,
                r,
                self._source,
                Leases(r, cfg.own, cfg.own.stream, lease_s=cfg.lease),
                anyio.CapacityLimiter(cfg.concurrency),
                self.stats,
                reader,
                self._log,
                m,
                sink,
            )
            task_status.started()
            async with anyio.create_task_group() as background:
                background.start_soon(self._keep_alive, reader)
                background.start_soon(self._trim, r)
                if sink is not None:
                    await background.start(sink.run)
                send, receive = anyio.create_memory_object_stream[Batch](0)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read, reader, send)
                    for _ in range(workers):
                        tg.start_soon(self._work, processor, receive.clone())
                    receive.close()
                background.cancel_scope.cancel()
            await self._leave(reader)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._source.close()
                await r.aclose()

    @property
    def batch_workers(self) -> int:
        """Batches in progress at once. A batch of the segments layout mostly waits for its
        segment, so more of them fill each segment: fewer PUTs for the same work."""
        return self.cfg.concurrency * (SEGMENT_WORKERS if self.cfg.layout == "segments" else 1)

    def stop(self) -> None:
        """Ask :meth:`run` to stop reading, finish its in-flight batches and return."""
        self._stopping.stop()

    async def _start(self, r: Redis) -> None:
        cfg = self.cfg
        await ping(r, cfg.effective_stream_url, "stream Redis")
        await self._source.check()
        try:
            await ensure_group(r, cfg.own.stream, cfg.group)
        except RedisError as exc:
            raise DependencyError(
                f"cannot create group {cfg.group!r} on {cfg.own.stream!r} at "
                f"{redact_url(cfg.effective_stream_url)}: {exc}"
            ) from exc

    async def _work(
        self, processor: BatchProcessor, receive: MemoryObjectReceiveStream[Batch]
    ) -> None:
        sink = processor.sink
        async with receive:
            async for batch in receive:
                if sink is None:
                    await processor.process(batch)
                    continue
                sink.batch_started()
                try:
                    await processor.process(batch)
                finally:
                    sink.batch_ended()

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, reader: GroupReader, send: MemoryObjectSendStream[Batch]) -> None:
        cfg = self.cfg
        retrying = Retrying(self._log, "upload", "read", cap=cfg.max_backoff, metrics=self._metrics)
        swept = False
        group_missing = False
        next_claim = anyio.current_time()
        async with send:
            while not self._stopping.requested:
                entries: list[RawEntry] = []
                try:
                    if group_missing:
                        await ensure_group(reader.r, cfg.own.stream, cfg.group)
                        self._log.warning("upload.group_recreated", group=cfg.group)
                        group_missing = False
                    if not swept:
                        # Our own entries from before a restart under the same name.
                        await self._sweep(reader, send)
                        swept = True
                    if anyio.current_time() >= next_claim:
                        await self._claim(reader, send)
                        next_claim = anyio.current_time() + cfg.claim_idle / 2
                    block = min(MAX_BLOCK, max(0.001, next_claim - anyio.current_time()))
                    entries = await self._next_batch(reader, block)
                except TRANSIENT as exc:
                    # The stream or the group was deleted (a FLUSHALL, an operator): recreate.
                    group_missing = isinstance(exc, ResponseError) and "NOGROUP" in str(exc)
                    with self._stopping.interruptible():
                        await retrying.failed("reader", exc)
                    continue
                retrying.succeeded("reader")
                if entries:
                    await send.send(Batch(entries))
            # A read that stop() cancelled may have been delivered to us and lost on the way:
            # such entries are pending on this consumer, so take them from its history.
            try:
                await self._sweep(reader, send)
            except TRANSIENT as exc:
                self._log.warning("upload.final_sweep_failed", error=f"{type(exc).__name__}: {exc}")

    async def _next_batch(self, reader: GroupReader, block: float) -> list[RawEntry]:
        """One batch of new entries: a blocking read, then top-ups while lingering.

        :meth:`stop` cancels it; entries already received are kept.
        """
        cfg = self.cfg
        got: list[RawEntry] = []
        with self._stopping.interruptible():
            got += await reader.read(cfg.batch_size, max(1, int(block * 1000)))
            deadline = anyio.current_time() + cfg.linger
            while got and len(got) < cfg.batch_size:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    break
                await anyio.sleep(min(remaining, cfg.linger / 4))
                try:
                    got += await reader.read(cfg.batch_size - len(got), None)
                except TRANSIENT as exc:
                    # The entries already read are in hand, so nobody else claims them while
                    # we live: process them now; the next read meets the error again.
                    self._log.warning("upload.top_up_failed", error=f"{type(exc).__name__}: {exc}")
                    break
        return got

    async def _sweep(self, reader: GroupReader, send: MemoryObjectSendStream[Batch]) -> None:
        """Process this consumer's pending entries that are not in hand (its history)."""
        async for entries in reader.sweep(self.cfg.batch_size):
            await send.send(Batch(entries, redo=True))

    async def _claim(self, reader: GroupReader, send: MemoryObjectSendStream[Batch]) -> None:
        """Take over entries idle for ``claim_idle``: their consumer is dead or stuck."""
        cfg = self.cfg
        start = "0-0"
        while True:
            start, fresh = await reader.claim(cfg.claim_idle, cfg.batch_size, start)
            if fresh:
                self.stats.claimed += len(fresh)
                self._log.info(
                    "upload.claimed", entries=len(fresh), first=fresh[0][0], last=fresh[-1][0]
                )
                await send.send(Batch(fresh, redo=True))
            if start == "0-0" or self._stopping.requested:
                return

    # -- background ---------------------------------------------------------------------------

    async def _keep_alive(self, reader: GroupReader) -> None:
        cfg = self.cfg
        while True:
            await anyio.sleep(cfg.claim_idle / 3)
            try:
                # Entries another consumer claimed from us less than this long ago stay theirs.
                await reader.keep_alive(min_idle_s=cfg.claim_idle / 6)
            except TRANSIENT as exc:
                self._log.debug("upload.keep_alive_failed", error=f"{type(exc).__name__}: {exc}")

    async def _trim(self, r: Redis) -> None:
        while True:
            await anyio.sleep(self.cfg.trim_interval)
            try:
                n = await trim(r, self.cfg.own.stream)
            except TRANSIENT as exc:
                self._log.debug("upload.trim_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if n:
                self._log.info("upload.trimmed", entries=n)

    async def _leave(self, reader: GroupReader) -> None:
        """Delete this consumer from the group when nothing is pending on it."""
        try:
            removed = await reader.leave()
        except TRANSIENT as exc:
            self._log.warning("upload.forget_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._log.info("upload.stopped", consumer_removed=removed, **asdict(self.stats))
