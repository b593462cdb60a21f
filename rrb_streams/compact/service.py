"""Running compaction: one pass now (``rrb-compact``), or a pass whenever one may be due
(:class:`AutoCompactor`, inside ``rrb`` and ``rrb-upload``).

Every process of a backup may run an :class:`AutoCompactor`; the lease makes one of them
compact at a time and the others stand by, so scaling uploaders out needs no setting.
"""

from __future__ import annotations

from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rrb_streams.compact.compactor import Compactor, PassReport, Schedule
from rrb_streams.compact.lease import CompactionLease
from rrb_streams.compact.metrics import CompactMetrics
from rrb_streams.config import CompactConfig
from rrb_streams.errors import RrbError
from rrb_streams.format.manifest import Manifest
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.service import StopRequest
from rrb_streams.storage.base import Storage
from rrb_streams.wire.slot_client import connect_own

_MAX_WAIT = 60.0  # seconds between looks, at most: a stopped compactor's successor waits this


def schedule_of(cfg: CompactConfig) -> Schedule:
    return Schedule(
        level1_every=cfg.level1_every,
        level2_every=cfg.level2_every,
        snapshot_every=cfg.snapshot_every,
        retention=cfg.retention,
        grace=cfg.grace,
    )


async def compact_once(
    cfg: CompactConfig, storage: Storage, r: Redis, log: Any, *, snapshot: bool = False
) -> PassReport | None:
    """Take the lease and run one pass; ``None`` when another process holds the lease."""
    done = await _held_pass(cfg, storage, r, log, snapshot=snapshot)
    if done is None:
        return None
    report, _ = done
    log.info("compact.pass", **report.to_dict())
    return report


async def _held_pass(
    cfg: CompactConfig, storage: Storage, r: Redis, log: Any, *, snapshot: bool = False
) -> tuple[PassReport, Manifest] | None:
    """One pass while holding the lease, renewed every third of it for as long as the pass
    runs (a snapshot of a large backup takes minutes). A renewal that finds the lease gone
    cancels the pass: it must not commit, and its outputs are retired by a later pass."""
    lease = CompactionLease(r, cfg.own, lease_s=cfg.lease)
    if not await lease.take():
        log.info("compact.standby", holder=await lease.holder())
        return None
    compactor = Compactor(
        storage, cfg.path_prefix, schedule_of(cfg), log, holds=lease.renew, writer=lease.token
    )
    lost = False

    async def keep(scope: anyio.CancelScope) -> None:
        nonlocal lost
        while True:
            await anyio.sleep(cfg.lease / 3)
            try:
                held = await lease.renew()
            except RedisError as exc:  # the next renewal may succeed within the lease
                log.warning("compact.lease_renewal_failed", error=str(exc))
                continue
            if not held:
                lost = True
                log.warning("compact.lease_lost", holder=await lease.holder())
                scope.cancel()
                return

    report = PassReport(lost=True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep, tg.cancel_scope)
            report = await compactor.run_pass(snapshot=snapshot)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await lease.release()
    report.lost = report.lost or lost
    return report, compactor.manifest


class AutoCompactor:
    """A component that runs a pass every ``level1_every`` (at most every minute), when it
    can take the lease. Failures are logged and counted; the next look tries again."""

    def __init__(self, cfg: CompactConfig, storage: Storage, metrics: Metrics | None) -> None:
        self._cfg = cfg
        self._storage = storage
        self._metrics = metrics.part(CompactMetrics) if metrics is not None else None
        self._log = get_logger("compact")
        self._stop = StopRequest()

    def stop(self) -> None:
        self._stop.stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self._cfg
        r = connect_own(cfg.stream_url, cfg.own, name="rrb-compact", tls=cfg.tls)
        task_status.started()
        try:
            while not self._stop.requested:
                with self._stop.interruptible():
                    await anyio.sleep(min(cfg.level1_every, _MAX_WAIT))
                if self._stop.requested:
                    break
                await self._look(r)
        finally:
            with anyio.CancelScope(shield=True):
                await r.aclose()

    async def _look(self, r: Redis) -> None:
        m = self._metrics
        try:
            done = await _held_pass(self._cfg, self._storage, r, self._log)
        except (RedisError, OSError, RrbError) as exc:  # the last version stays whole
            self._log.warning("compact.failed", error=str(exc), kind=type(exc).__name__)
            if m is not None:
                m.runs.labels("failed").inc()
            return
        if done is None:
            if m is not None:
                m.runs.labels("standby").inc()
            return
        report, manifest = done
        if report.steps or report.deleted or report.retired:
            self._log.info("compact.pass", **report.to_dict())
        if m is not None:
            m.passed(report, manifest)
