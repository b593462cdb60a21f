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
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.service import StopRequest
from rrb_streams.storage.base import Storage
from rrb_streams.wire.connections import connect

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
    lease = CompactionLease(r, cfg.own, lease_s=cfg.lease)
    if not await lease.take():
        log.info("compact.standby", holder=await lease.holder())
        return None
    try:
        compactor = Compactor(
            storage, cfg.path_prefix, schedule_of(cfg), log, holds=lease.renew, writer=lease.token
        )
        report = await compactor.run_pass(snapshot=snapshot)
        log.info("compact.pass", **report.to_dict())
        return report
    finally:
        with anyio.CancelScope(shield=True):
            await lease.release()


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
        r = connect(cfg.stream_url, name="rrb-compact", tls=cfg.tls)
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
            lease = CompactionLease(r, self._cfg.own, lease_s=self._cfg.lease)
            if not await lease.take():
                if m is not None:
                    m.runs.labels("standby").inc()
                return
            try:
                compactor = Compactor(
                    self._storage,
                    self._cfg.path_prefix,
                    schedule_of(self._cfg),
                    self._log,
                    holds=lease.renew,
                    writer=lease.token,
                )
                report = await compactor.run_pass()
            finally:
                with anyio.CancelScope(shield=True):
                    await lease.release()
        except (
            RedisError,
            OSError,
            RrbError,
        ) as exc:  # a failed pass leaves the last version whole
            self._log.warning("compact.failed", error=str(exc), kind=type(exc).__name__)
            if m is not None:
                m.runs.labels("failed").inc()
            return
        if report.steps or report.deleted or report.retired:
            self._log.info("compact.pass", **report.to_dict())
        if m is not None:
            m.passed(report, compactor.manifest)
