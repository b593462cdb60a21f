"""Gap rescans: SCAN the watched keys into the change stream whenever events may be missing.

``Gaps`` collects the reasons (startup, reconnect, a restart) and numbers them; a rescan that
sees a newer number starts over from cursor 0, because keys it already passed may have changed
while no events arrived. The scan pauses between steps so the source keeps serving clients, and
it feeds the same bounded channel as live events, so it can never outrun the writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rrb_streams.changes import SCAN_EVENT
from rrb_streams.config import BridgeConfig
from rrb_streams.connections import url_db

# (db, raw key, event, bridge time in ms): one future stream entry.
Change = tuple[int, bytes, str, int]

RETRYABLE = (RedisError, OSError)


def now_ms() -> int:
    """The bridge's wall clock in milliseconds, as stamped into entries."""
    return time.time_ns() // 1_000_000


class Retry(Protocol):
    """One retry loop's backoff: ``failed`` sleeps (longer each time), ``succeeded`` resets."""

    async def failed(self, exc: BaseException) -> None: ...

    def succeeded(self) -> None: ...


class Gaps:
    """Why a rescan is owed, and a generation number that restarts a running one."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._event = anyio.Event()
        self._reasons: list[str] = []
        self.generation = 0

    def report(self, reason: str, **details: Any) -> None:
        """Record a gap (logged as ``bridge.gap_detected``) and wake or restart the rescan."""
        self._log.info("bridge.gap_detected", reason=reason, **details)
        self.generation += 1
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._event.set()

    async def wait(self) -> list[str]:
        """Wait for a gap; return the reasons reported since the last call."""
        await self._event.wait()
        self._event = anyio.Event()
        reasons, self._reasons = self._reasons, []
        return reasons


class Rescanner:
    """Runs one rescan per burst of gaps, logging ``bridge.rescan_done`` with counts."""

    def __init__(
        self,
        cfg: BridgeConfig,
        gaps: Gaps,
        client: Callable[[int], Redis],
        retry: Retry,
        log: Any,
    ) -> None:
        self._cfg = cfg
        self._db = url_db(cfg.source_url)
        self._own = cfg.own
        self._gaps = gaps
        self._client = client  # the source client for one db
        self._retry = retry
        self._log = log

    async def run(self, send: MemoryObjectSendStream[Change]) -> None:
        """Forever: wait for a gap, then send every watched key of the source URL's db (or of
        every non-empty db with ``all_dbs``) to ``send`` as a ``scan`` change."""
        reasons: list[str] = []
        started: float | None = None
        while True:
            reasons += [r for r in await self._gaps.wait() if r not in reasons]
            generation = self._gaps.generation
            started = started or time.monotonic()
            dbs = [self._db] if not self._cfg.all_dbs else await self._databases(generation)
            counts = None if dbs is None else await self._scan(send, generation, dbs)
            if counts is None:
                self._log.info("bridge.rescan_restarted", reasons=reasons)
                continue
            keys, skipped = counts
            self._log.info(
                "bridge.rescan_done",
                reasons=reasons,
                keys=keys,
                skipped_own=skipped,
                dbs=dbs,
                seconds=round(time.monotonic() - started, 3),
            )
            reasons, started = [], None

    async def _scan(
        self, send: MemoryObjectSendStream[Change], generation: int, dbs: list[int]
    ) -> tuple[int, int] | None:
        """``(keys enqueued, own keys skipped)``, or ``None`` when a newer gap interrupts."""
        cfg = self._cfg
        keys = skipped = 0
        for db in dbs:
            client = self._client(db)
            cursor = 0
            while True:
                if self._gaps.generation != generation:
                    return None
                try:
                    cursor, found = await client.scan(
                        cursor=cursor, match=cfg.pattern, count=cfg.scan_count
                    )
                except RETRYABLE as exc:
                    # Cursors are stateless on the server, so retrying the step is enough; a
                    # restarted source reports a gap of its own and the scan starts over.
                    await self._retry.failed(exc)
                    continue
                self._retry.succeeded()
                now = now_ms()
                for key in cast(list[bytes], found):
                    if self._own.is_own(key):
                        skipped += 1
                        continue
                    await send.send((db, key, SCAN_EVENT, now))
                    keys += 1
                if cursor == 0:
                    break
                await anyio.sleep(cfg.scan_pause)
        return keys, skipped

    async def _databases(self, generation: int) -> list[int] | None:
        """Every db INFO keyspace lists (those holding keys), or ``None`` if interrupted."""
        while self._gaps.generation == generation:
            try:
                info: dict[str, Any] = await self._client(self._db).info("keyspace")
            except RETRYABLE as exc:
                await self._retry.failed(exc)
                continue
            self._retry.succeeded()
            return sorted(int(name[2:]) for name in info if name.startswith("db"))
        return None
