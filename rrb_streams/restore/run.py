"""rrb-restore: one process of a restore run, with ``-c`` writers in its consumer group.

A process:

1. checks the target (reachable, writable, accepts ``RESTORE``; its RDB version and clock:
   :mod:`rrb_streams.restore.checks`), and finds whether it, and the Redis of the run's own
   keys, are Redis Cluster nodes: then the writers route each key to its slot's master
   (:mod:`rrb_streams.restore.cluster_target`), the cluster must have every slot assigned,
   and the run's own keys live in one slot, reached through a client that follows that
   slot's master (:func:`rrb_streams.wire.slot_client.connect_own`);
2. joins the run (:mod:`rrb_streams.restore.state`), creating it when it is new;
3. runs, until the run is finished or :meth:`Restorer.stop`:

   - a **coordinator** that plans the run (:class:`rrb_streams.restore.planner.Planner`)
     while it holds the planner lock, and takes the lock over when the planning process died;
   - a **reader** (:class:`rrb_streams.wire.group.GroupReader`): ``XREADGROUP`` of new
     entries (each a batch of keys), and every ``claim_idle / 2`` seconds an ``XAUTOCLAIM`` of
     entries idle for ``claim_idle`` (their writer died). Entries reach the writers through
     a memory stream without a buffer, so at most ``concurrency + 1`` batches are in memory;
   - ``concurrency`` **writers**, each with one entry at a time:
     :meth:`rrb_streams.restore.writer.Writer.apply`, then the ack;
   - **progress**, from the run's counters, so it counts every process's work.

A run is finished when the plan is complete and every entry is delivered and acknowledged;
the process that sees it first deletes the run's keys and reports the run's totals.

Storage and Redis outages are retried with capped backoff; after ``retry_timeout`` seconds
without a success the process stops with an error, and running the command again resumes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from rrb_streams.config import RestoreConfig
from rrb_streams.errors import DependencyError
from rrb_streams.format.layout import key_dir
from rrb_streams.format.ranges import Range
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.ops.progress import Progress
from rrb_streams.ops.timed import TimedStorage
from rrb_streams.restore.checks import find_clusters, probe_key, probe_target
from rrb_streams.restore.cluster_target import ClusterTarget
from rrb_streams.restore.planner import Planner
from rrb_streams.restore.state import (
    GROUP,
    Ack,
    PlannerLockLost,
    RunKeys,
    RunState,
    Totals,
    describe,
    run_id,
)
from rrb_streams.restore.stats import ProcessStats, RestoreMetrics
from rrb_streams.restore.writer import FAILED, Tally, Writer
from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.service import StopRequest
from rrb_streams.storage.base import Storage
from rrb_streams.wire.cluster import slot_of
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.group import GroupReader, RawEntry
from rrb_streams.wire.slot_client import connect_own, connect_slot
from rrb_streams.wire.urls import redact_url

MAX_BLOCK_MS = 50  # short: the end of a run is noticed within this long
PLANNER_TTL = 15.0  # seconds the planner's lock lasts unless renewed


@dataclass(frozen=True, slots=True)
class RangeWork:
    """A restore-stream entry of the segment layout: one key range."""

    range: Range
    records: int  # as planned: what the entry adds to the run's ``done``
    mixed: bool  # the prefix holds the keys layout as well


# An entry id, and each key's candidate object names or one key range.
Entry = tuple[str, list[tuple[str, ...]] | RangeWork]


@dataclass
class Report:
    """How the process ended, for the summary and the exit status."""

    run: str
    resumed: bool
    finished: bool  # the run is complete
    stats: ProcessStats
    totals: Totals | None  # the run's totals, when this process finished the run

    @property
    def failed(self) -> int:
        if self.totals is not None:
            return self.totals["failed"]
        return self.stats.outcomes[FAILED]


class Restorer:
    """One process of a restore run. ``storage`` belongs to the caller."""

    def __init__(
        self,
        cfg: RestoreConfig,
        storage: Storage,
        *,
        progress: Progress | None = None,
        metrics: Metrics | None = None,
    ):
        self.cfg = cfg
        self.storage = storage if metrics is None else TimedStorage(storage, metrics)
        self._metrics = metrics
        self.run_id = run_id(cfg)
        self.keys = RunKeys(cfg.own_prefix, self.run_id)
        self.stats = ProcessStats()
        if metrics is not None:
            metrics.part(RestoreMetrics).track(self.stats)
        self.report: Report | None = None
        self.resumed = False
        self._progress = progress
        self._log = get_logger("restore", run=self.run_id, consumer=cfg.consumer)
        self._stopping = StopRequest()
        self._finished = False
        self._retrying = Retrying(
            self._log, "restore", "write", cap=cfg.max_backoff, metrics=metrics
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Restore until the run is finished or :meth:`stop`; then set :attr:`report`.

        Raises ``DependencyError`` before ``task_status.started()`` when the target, the
        stream's Redis or the storage cannot be used, and later when an outage outlasts
        ``retry_timeout``; ``ConfigError`` before it for a Redis Cluster that cannot be
        restored into (slots unassigned, a db other than 0 in its URL).
        """
        target_cluster, stream_cluster = await find_clusters(self.cfg)
        cfg = self.cfg = replace(self.cfg, stream_cluster=stream_cluster)
        self.keys = RunKeys(cfg.own_prefix, self.run_id, cluster=stream_cluster)
        r = connect_own(cfg.effective_stream_url, cfg.own, name="rrb-restore", tls=cfg.tls)
        # Unique even when two processes were given the same --consumer.
        state = RunState(r, self.keys, token=f"{cfg.consumer}:{secrets.token_hex(4)}")
        reader = GroupReader(r, self.keys.stream, GROUP, cfg.consumer)
        writer: Writer | None = None
        try:
            writer = await self._open_writer(cluster=target_cluster)
            await self._join(r, state, writer)
            task_status.started()
            async with anyio.create_task_group() as background:
                background.start_soon(self._coordinate, state)
                background.start_soon(self._show_progress, state)
                send, receive = anyio.create_memory_object_stream[Entry](0)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read, state, reader, send)
                    for _ in range(cfg.concurrency):
                        tg.start_soon(self._write, state, reader, writer, receive.clone())
                    receive.close()
                background.cancel_scope.cancel()
            self.stats.ended = time.monotonic()
            totals = await self._end(state, reader)
            self.report = Report(self.run_id, self.resumed, self._finished, self.stats, totals)
        finally:
            if self._progress is not None:
                self._progress.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if writer is not None:
                    await writer.close()
                await r.aclose()

    def stop(self) -> None:
        """Stop reading; the writers finish and acknowledge their batches, and run returns."""
        self._stopping.stop()

    # -- start and end ----------------------------------------------------------------------

    async def _open_writer(self, *, cluster: bool) -> Writer:
        """Check the target (a Redis Cluster when ``cluster``) and open its writer."""
        cfg = self.cfg
        routed: ClusterTarget | None = None
        if cluster:
            routed = ClusterTarget(cfg.target_url, tls=cfg.tls)
            slot = slot_of(probe_key(cfg, cluster=True).encode())
            target = connect_slot(cfg.target_url, slot, name="rrb-restore", tls=cfg.tls)
        else:
            target = connect(cfg.target_url, name="rrb-restore", tls=cfg.tls)
        try:
            if routed is not None:
                # First: a cluster with slots unassigned refuses every write (CLUSTERDOWN),
                # and the probe would blame the target for what one clear line can name.
                await routed.start()
            await ping(target, cfg.target_url, "target Redis")
            rdb, offset_ms = await probe_target(target, cfg, cluster=cluster)
        except BaseException:
            if routed is not None:
                with anyio.CancelScope(shield=True):
                    await routed.close()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await target.aclose()
        return Writer(
            cfg,
            self.storage,
            target_rdb=rdb,
            clock_offset_ms=offset_ms,
            log=self._log,
            cluster=routed,
        )

    async def _join(self, r: Redis, state: RunState, writer: Writer) -> None:
        cfg = self.cfg
        await ping(r, cfg.effective_stream_url, "stream Redis")
        try:
            self.resumed = await state.join(describe(cfg))
        except RedisError as exc:
            raise DependencyError(
                f"cannot create the restore stream {self.keys.stream!r} at "
                f"{redact_url(cfg.effective_stream_url)}: {exc}"
            ) from exc
        totals = await state.totals()
        self._log.info(
            "restore.joined" if self.resumed else "restore.created",
            stream=self.keys.stream,
            done=totals["done"],
            planned=totals["planned"],
            target_rdb=writer.target_rdb,
            target_cluster=writer.cluster is not None,
            stream_cluster=cfg.stream_cluster,
        )

    async def _end(self, state: RunState, reader: GroupReader) -> Totals | None:
        try:
            if self._finished:
                totals = await state.finish()
                if totals is not None:
                    self._show(totals)
                    self._log.info("restore.finished", **totals.counters)
                return totals
            if await state.exists():
                self._show(await state.totals())
                await reader.leave()
        except TRANSIENT as exc:
            self._log.warning("restore.end_failed", error=f"{type(exc).__name__}: {exc}")
        return None

    # -- planning ---------------------------------------------------------------------------

    async def _coordinate(self, state: RunState) -> None:
        """Plan the run whenever nobody else does, until the plan is complete."""
        retrying = Retrying(
            self._log, "restore", "plan", cap=self.cfg.max_backoff, metrics=self._metrics
        )
        while True:
            try:
                if (await state.totals()).plan_done:
                    return
                if await state.take_planner(PLANNER_TTL):
                    try:
                        await self._plan(state)
                    finally:
                        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                            await state.release_planner()
                    retrying.succeeded("planner")
                    continue
            except PlannerLockLost:
                self._log.warning("restore.planner_lock_lost")
            except TRANSIENT as exc:
                await retrying.failed("planner", exc)
                self._give_up_after(retrying, exc)
                continue
            await anyio.sleep(PLANNER_TTL / 3)

    async def _plan(self, state: RunState) -> None:
        """Run the planner under the lock, renewing it; stop at once when it is lost."""
        lost = False
        async with anyio.create_task_group() as tg:

            async def keep_lock() -> None:
                nonlocal lost
                while True:
                    await anyio.sleep(PLANNER_TTL / 3)
                    with contextlib.suppress(*TRANSIENT):
                        if not await state.renew_planner(PLANNER_TTL):
                            lost = True
                            tg.cancel_scope.cancel()
                            return

            tg.start_soon(keep_lock)
            await Planner(self.cfg, self.storage, state, self._log).run()
            tg.cancel_scope.cancel()
        if lost:
            raise PlannerLockLost(f"lost the planner's lock of {self.keys.stream}")

    # -- reading ----------------------------------------------------------------------------

    async def _read(
        self, state: RunState, reader: GroupReader, send: MemoryObjectSendStream[Entry]
    ) -> None:
        cfg = self.cfg
        retrying = Retrying(
            self._log, "restore", "read", cap=cfg.max_backoff, metrics=self._metrics
        )
        next_claim = anyio.current_time()
        async with send:
            # Entries pending on this consumer name from an earlier run of it.
            await self._sweep(reader, send)
            while not self._stopping.requested:
                try:
                    entries: list[RawEntry] = []
                    if anyio.current_time() >= next_claim:
                        # One batch at most per claim: each entry is a whole batch of keys.
                        _, entries = await reader.claim(cfg.claim_idle, 1)
                        if entries:
                            self.stats.claimed += len(entries)
                            self._log.info("restore.claimed", entries=len(entries))
                        next_claim = anyio.current_time() + cfg.claim_idle / 2
                    if not entries:
                        with self._stopping.interruptible():
                            entries = await reader.read(1, MAX_BLOCK_MS)
                    if not entries and not self._stopping.requested and await state.finished():
                        self._finished = True
                        return
                except ResponseError as exc:
                    if "NOGROUP" in str(exc) and not await state.exists():
                        # Another process saw the run finish and deleted its keys.
                        self._log.info("restore.finished_elsewhere")
                        self._finished = True
                        return
                    await retrying.failed("reader", exc)
                    self._give_up_after(retrying, exc)
                    continue
                except TRANSIENT as exc:
                    await retrying.failed("reader", exc)
                    self._give_up_after(retrying, exc)
                    continue
                retrying.succeeded("reader")
                for entry in entries:
                    await send.send(_batch(entry))
            # A read that stop() cut short may have been delivered to us all the same: such
            # entries are pending on this consumer, so take them from its history.
            await self._sweep(reader, send)

    async def _sweep(self, reader: GroupReader, send: MemoryObjectSendStream[Entry]) -> None:
        """Hand the writers this consumer's pending entries that are not in hand already."""
        try:
            async for entries in reader.sweep(1):
                for entry in entries:
                    await send.send(_batch(entry))
        except TRANSIENT as exc:
            # Left pending: a live writer claims them after --claim-idle.
            self._log.warning("restore.sweep_failed", error=f"{type(exc).__name__}: {exc}")

    # -- writing ----------------------------------------------------------------------------

    async def _write(
        self,
        state: RunState,
        reader: GroupReader,
        writer: Writer,
        receive: MemoryObjectReceiveStream[Entry],
    ) -> None:
        task = object()
        async with receive:
            async for entry_id, work in receive:
                if isinstance(work, RangeWork):
                    apply = functools.partial(writer.apply_range, work.range, mixed=work.mixed)
                    tally, seen = await self._until_done(task, apply)
                    if work.mixed:
                        groups = [key_dir(self.cfg.path_prefix, db, key) for db, key in seen]
                        await self._until_done(task, functools.partial(state.mark_seen, groups))
                    ack = _ack(entry_id, tally, done=work.records)
                else:
                    results = await self._until_done(task, functools.partial(writer.apply, work))
                    tally = Tally.of(results)
                    ack = _ack(entry_id, tally, done=len(results))
                await self._until_done(task, functools.partial(state.ack, [ack]))
                for outcome, n in tally.counts.items():
                    self.stats.outcomes[outcome] += n
                self.stats.bytes += tally.bytes
                reader.done([entry_id])

    async def _until_done(self, task: object, call: Any) -> Any:
        while True:
            try:
                result = await call()
            except TRANSIENT as exc:
                await self._retrying.failed(task, exc)
                self._give_up_after(self._retrying, exc)
                continue
            self._retrying.succeeded(task)
            return result

    def _give_up_after(self, retrying: Retrying, exc: BaseException) -> None:
        waited = retrying.outage_seconds()
        if waited >= self.cfg.retry_timeout:
            raise DependencyError(
                f"gave up after {waited:.0f} s of failures ({type(exc).__name__}: {exc}); "
                "run the same command again to resume"
            ) from exc

    # -- progress ---------------------------------------------------------------------------

    def _show(self, totals: Totals) -> None:
        """The progress as it ends, so the last line shown is the last state."""
        if self._progress is not None:
            self._progress.update(totals["done"], totals["planned"], listing_done=totals.plan_done)

    async def _show_progress(self, state: RunState) -> None:
        progress = self._progress
        if progress is None:
            return
        while True:
            with contextlib.suppress(*TRANSIENT):
                t = await state.totals()
                progress.update(t["done"], t["planned"], listing_done=t.plan_done)
            await anyio.sleep(progress.interval)


def _ack(entry_id: str, tally: Tally, *, done: int) -> Ack:
    """``done``: what the entry adds to the run's progress."""
    counts = {**tally.counts, "bytes": tally.bytes, "done": done}
    return Ack(entry_id, counts, [(res.name, res.reason) for res in tally.failures])


def _batch(entry: RawEntry) -> Entry:
    """A restore-stream entry as a batch; one whose batch cannot be read becomes a batch of
    one nameless item, which the writer reports as failed."""
    entry_id, fields = entry
    try:
        if b"r" in fields:
            rng = Range.from_json(fields[b"r"])
            return entry_id, RangeWork(rng, int(fields[b"n"]), fields.get(b"m") == b"1")
        # An entry deleted while pending has no fields: nothing to write, only to ack.
        items = [tuple(names) for names in json.loads(fields[b"i"])] if fields else []
    except (KeyError, ValueError, TypeError, IndexError):
        items = [()]
    return entry_id, items
