"""What one restore process did, and its Prometheus metrics (meanings: docs/operations.md).

The run's totals span every process and attempt and live in Redis (:mod:`.state`); these
counters are this process's share, for its summary line and its ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from rrb_streams.ops.metrics import Metrics
from rrb_streams.restore.writer import OUTCOMES


@dataclass
class ProcessStats:
    """What this process did (the run's totals span every process and attempt)."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    bytes: int = 0
    claimed: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class RestoreMetrics:
    """The restore writers' metrics of one process: ``metrics.part(RestoreMetrics)``."""

    def __init__(self, metrics: Metrics) -> None:
        self._stats: list[ProcessStats] = []
        metrics.add_collector(_RestoreCollector(self._stats))

    def track(self, stats: ProcessStats) -> None:
        """Export ``stats`` (summed with any other tracked restorer's) as counters."""
        self._stats.append(stats)


class _RestoreCollector(Collector):
    """Reads the tracked restorers' own counters at scrape time."""

    def __init__(self, stats: list[ProcessStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "rrb_restore_objects",
            "Objects (one per key) handled by this process's restore writers, by outcome.",
            labels=["outcome"],
        )
        for outcome in sorted({o for s in self._stats for o in s.outcomes}):
            outcomes.add_metric([outcome], sum(s.outcomes.get(outcome, 0) for s in self._stats))
        yield outcomes
        yield CounterMetricFamily(
            "rrb_restore_bytes",
            "Bytes of values restored into the target by this process.",
            value=sum(s.bytes for s in self._stats),
        )
        yield CounterMetricFamily(
            "rrb_restore_claimed_batches",
            "Restore batches taken over from writers that died.",
            value=sum(s.claimed for s in self._stats),
        )
