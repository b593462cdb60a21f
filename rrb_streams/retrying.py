"""Transient failures, and capped exponential backoff for the loops that retry them.

:data:`TRANSIENT` is every failure that says nothing about the work itself (a Redis connection
lost, storage unavailable): the work is retried as it is, never dead-lettered or given up on
for that reason alone.

:class:`Retrying` is the one backoff every retry loop uses, alone or in a group of tasks that
fail and recover together.

Every task backs off on its own schedule (its delay doubles with each of its own consecutive
failures, up to a cap, and resets when it succeeds), but the log tells one story per outage:
``<component>.retry`` with the group's ``consecutive_errors`` on each failure, and
``<component>.recovered`` once, when the last failing task has succeeded again. A task that
never failed cannot announce a recovery it did not see.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import anyio
from redis.exceptions import RedisError

from rrb_streams.errors import StorageError

if TYPE_CHECKING:
    from rrb_streams.ops.metrics import Metrics

#: Failures to retry after a backoff: Redis or storage unreachable, a connection lost. (A
#: storage error that retrying cannot fix, ``ObjectRejected``, is caught closer to its call.)
TRANSIENT: tuple[type[Exception], ...] = (StorageError, RedisError, OSError)

BASE_DELAY = 0.05


class Retrying:
    """Shared retry bookkeeping for the tasks of one ``stage`` (``read``, ``batch``, …).

    A loop of its own passes any fixed token as ``task`` (its name, or itself).
    """

    def __init__(
        self,
        log: Any,
        event_prefix: str,
        stage: str,
        *,
        cap: float,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: where to count each failure, under the component ``event_prefix``."""
        self._log = log
        self._metrics = metrics
        self._prefix = event_prefix
        self._stage = stage
        self._cap = cap
        self._failing: dict[object, int] = {}  # task token -> its consecutive failures
        self._outage_since: float | None = None
        self.consecutive_errors = 0

    @property
    def failing(self) -> bool:
        """Whether some task of this stage is between a failure and its next success."""
        return bool(self._failing)

    def outage_seconds(self) -> float:
        """How long some task of this stage has been failing without all of them recovering."""
        if self._outage_since is None:
            return 0.0
        return anyio.current_time() - self._outage_since

    async def failed(self, task: object, exc: BaseException) -> None:
        """Log the failure of ``task`` and sleep its backoff. Never call it for cancellation."""
        if self._outage_since is None:
            self._outage_since = anyio.current_time()
        n = self._failing.get(task, 0) + 1
        self._failing[task] = n
        self.consecutive_errors += 1
        if self._metrics is not None:
            self._metrics.retried(self._prefix, exc)
        delay = min(self._cap, BASE_DELAY * 2 ** min(n - 1, 30)) * random.uniform(0.5, 1.0)
        self._log.warning(
            f"{self._prefix}.retry",
            stage=self._stage,
            consecutive_errors=self.consecutive_errors,
            error=f"{type(exc).__name__}: {exc}",
            retry_in=round(delay, 3),
        )
        await anyio.sleep(delay)

    def succeeded(self, task: object) -> None:
        """Record a success of ``task``; logs ``recovered`` when it was the last one failing."""
        if self._failing.pop(task, None) is None or self._failing:
            return
        self._log.info(
            f"{self._prefix}.recovered", stage=self._stage, after_errors=self.consecutive_errors
        )
        self.consecutive_errors = 0
        self._outage_since = None

    def forget(self, task: object) -> None:
        """Drop ``task`` (it ended without succeeding again) so it cannot block ``recovered``."""
        self._failing.pop(task, None)
        if not self._failing:
            self.consecutive_errors = 0
            self._outage_since = None
