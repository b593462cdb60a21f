"""Prometheus metrics of one rrb process (names and meanings: docs/operations.md).

Every :class:`Metrics` has its own registry, never prometheus-client's global one, so
components running side by side in one interpreter (tests do) never share a counter.
Components take ``metrics=None`` and then record nothing, so a process started without
``--metrics-port`` pays nothing for them.

Counters that a component already keeps for its logs
(:class:`~rrb_streams.backup.batch.UploadStats`, the restore's process stats) are not
counted twice: a collector reads them at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import anyio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rrb_streams.ops.status import StreamStatus, collect
from rrb_streams.wire.entries import SCAN_EVENT
from rrb_streams.wire.keys import OwnKeys

if TYPE_CHECKING:
    from rrb_streams.backup.batch import UploadStats
    from rrb_streams.restore.run import ProcessStats

POLL_INTERVAL = 5.0  # seconds between reads of the change stream's gauges
POLL_TIMEOUT = 2.0

_STORAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# (metric name without _total, help, UploadStats field)
_UPLOAD_COUNTERS = (
    ("rrb_upload_entries", "Change entries acknowledged, dead letters included.", "entries_acked"),
    ("rrb_upload_objects_written", "Key states written to storage.", "puts"),
    (
        "rrb_upload_objects_deleted",
        "Absences recorded in storage: an object deleted, or with --versioning a tombstone "
        "version written.",
        "deletes",
    ),
    (
        "rrb_upload_claimed_entries",
        "Entries taken over from other consumers (XAUTOCLAIM).",
        "claimed",
    ),
    ("rrb_upload_dead_letters", "Entries moved to the dead-letter stream.", "dead_lettered"),
    (
        "rrb_upload_coalesced_entries",
        "Entries acknowledged without a write of their own (merged, or already covered).",
        "coalesced",
    ),
    (
        "rrb_upload_unchanged_keys",
        "Keys read and found as storage holds them already: no write.",
        "unchanged",
    ),
    (
        "rrb_upload_redone_keys",
        "Keys read and written again because their lease ran out during the write.",
        "redone",
    ),
)


class Metrics:
    """Every metric of one process, in :attr:`registry`. Safe for one event loop's tasks."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self._upload_stats: list[UploadStats] = []
        self._restore_stats: list[ProcessStats] = []
        self._leader_gauge: Gauge | None = None
        r.register(_StatsCollector(self))

        self.bridge_events = Counter(
            "rrb_bridge_events", "Keyspace events written to the change stream.", registry=r
        )
        self.bridge_rescan_entries = Counter(
            "rrb_bridge_rescan_entries",
            "Entries written to the change stream by gap rescans.",
            registry=r,
        )
        self.bridge_rescans = Counter(
            "rrb_bridge_rescans",
            "Gap rescans finished, by each reason that made them (one rescan may have several).",
            ["reason"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "rrb_upload_bytes", "Bytes of objects written to storage.", registry=r
        )
        self.upload_last_write = Gauge(
            "rrb_upload_last_write_timestamp_seconds",
            "Unix time at which storage last confirmed a batch's writes.",
            registry=r,
        )
        self.upload_lag = Histogram(
            "rrb_upload_lag_seconds",
            "Seconds from a key's read from the source (the source's clock) to storage "
            "confirming its write (this host's clock).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.storage_seconds = Histogram(
            "rrb_storage_call_seconds",
            "Duration of storage calls, failed ones included.",
            ["op"],
            buckets=_STORAGE_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "rrb_retries", "Failed attempts that are retried after a backoff.", ["component"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "rrb_errors",
            "Errors, by component and kind (an exception class name, or a per-key failure).",
            ["component", "kind"],
            registry=r,
        )
        self.stream_length = Gauge(
            "rrb_stream_length", "Entries in the change stream (XLEN).", registry=r
        )
        self.stream_dead_letters = Gauge(
            "rrb_stream_dead_letters", "Entries in the dead-letter stream.", registry=r
        )
        self.stream_pending = Gauge(
            "rrb_stream_group_pending",
            "Entries delivered to a consumer of the group and not yet acknowledged.",
            ["group"],
            registry=r,
        )
        self.stream_lag = Gauge(
            "rrb_stream_group_lag",
            "Entries of the stream not yet delivered to the group.",
            ["group"],
            registry=r,
        )
        self.stream_oldest_pending = Gauge(
            "rrb_stream_oldest_pending_age_seconds",
            "Age of the group's oldest pending entry (0 when none is pending).",
            ["group"],
            registry=r,
        )
        self.stream_polled = Gauge(
            "rrb_stream_polled_timestamp_seconds",
            "Unix time of the last successful read of the stream gauges.",
            registry=r,
        )

    # -- recording ------------------------------------------------------------------------

    def watch_leadership(self, leading: Callable[[], bool]) -> None:
        """Export ``rrb_bridge_leader``: 1 while ``leading()``, read at scrape time. A later
        call (the bridge run again) replaces the earlier callable."""
        if self._leader_gauge is None:
            self._leader_gauge = Gauge(
                "rrb_bridge_leader",
                "1 while this bridge holds the leader lease and writes, 0 while it stands by.",
                registry=self.registry,
            )
        self._leader_gauge.set_function(lambda: 1.0 if leading() else 0.0)

    def bridged(self, changes: Iterable[tuple[int, bytes, str, int]]) -> None:
        """Count a batch of changes the bridge wrote to the stream."""
        total = rescanned = 0
        for change in changes:
            total += 1
            rescanned += change[2] == SCAN_EVENT
        self.bridge_events.inc(total - rescanned)
        self.bridge_rescan_entries.inc(rescanned)

    def rescanned(self, reasons: Iterable[str]) -> None:
        """Count one finished gap rescan under each of its reasons."""
        for reason in reasons:
            self.bridge_rescans.labels(reason).inc()

    def stored(self, read_at_us: Sequence[int]) -> None:
        """Storage confirmed the writes of keys read at ``read_at_us`` (source clock, µs)."""
        now = time.time()
        observe = self.upload_lag.observe
        for us in read_at_us:
            # Clocks of different hosts may disagree by a little: never a negative lag.
            observe(max(0.0, now - us / 1_000_000))
        self.upload_last_write.set(now)

    def retried(self, component: str, exc: BaseException) -> None:
        """Count a failed attempt that will be retried, and its error."""
        self.retries.labels(component).inc()
        self.error(component, type(exc).__name__)

    def error(self, component: str, kind: str) -> None:
        """Count an error of ``kind``: an exception class name or a fixed failure name."""
        self.errors.labels(component, kind).inc()

    def track_upload(self, stats: UploadStats) -> None:
        """Export ``stats`` (summed with any other tracked uploader's) as counters."""
        self._upload_stats.append(stats)

    def track_restore(self, stats: ProcessStats) -> None:
        """Export a restore process's ``stats`` as counters."""
        self._restore_stats.append(stats)

    def set_stream(self, status: StreamStatus) -> None:
        """Set the stream gauges from one :func:`rrb_streams.ops.status.collect`."""
        self.stream_length.set(status.length)
        self.stream_dead_letters.set(status.dead_letters)
        # Cleared and set without an await in between: a scrape never sees a half state.
        for gauge in (self.stream_pending, self.stream_lag, self.stream_oldest_pending):
            gauge.clear()
        for g in status.groups:
            self.stream_pending.labels(g.name).set(g.pending)
            if g.lag is not None:
                self.stream_lag.labels(g.name).set(g.lag)
            self.stream_oldest_pending.labels(g.name).set((g.oldest_pending_age_ms or 0) / 1000)
        self.stream_polled.set(time.time())

    # -- reading --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Reads the tracked components' own counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        uploads = self._m._upload_stats
        if uploads:
            for name, doc, attr in _UPLOAD_COUNTERS:
                yield CounterMetricFamily(name, doc, value=sum(getattr(s, attr) for s in uploads))
        restores = self._m._restore_stats
        if restores:
            outcomes = CounterMetricFamily(
                "rrb_restore_objects",
                "Objects (one per key) handled by this process's restore writers, by outcome.",
                labels=["outcome"],
            )
            names = sorted({o for s in restores for o in s.outcomes})
            for outcome in names:
                outcomes.add_metric([outcome], sum(s.outcomes.get(outcome, 0) for s in restores))
            yield outcomes
            yield CounterMetricFamily(
                "rrb_restore_bytes",
                "Bytes of values restored into the target by this process.",
                value=sum(s.bytes for s in restores),
            )
            yield CounterMetricFamily(
                "rrb_restore_claimed_batches",
                "Restore batches taken over from writers that died.",
                value=sum(s.claimed for s in restores),
            )


async def poll_stream(metrics: Metrics, r: Redis, own: OwnKeys, interval: float) -> None:
    """Forever: read the change stream's state into the stream gauges every ``interval``.

    A failed read counts ``rrb_errors_total{component="metrics"}`` and leaves the gauges as
    they were; ``rrb_stream_polled_timestamp_seconds`` shows how old they are.
    """
    while True:
        try:
            with anyio.fail_after(POLL_TIMEOUT):
                status = await collect(r, own)
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.error("metrics", type(exc).__name__)
        else:
            metrics.set_stream(status)
        await anyio.sleep(interval)
