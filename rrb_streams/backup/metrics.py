"""The backup flow's counters, and their Prometheus metrics (meanings: docs/operations.md).

:class:`UploadStats` are an uploader's own counters, for its logs and for tests; with metrics
on, :class:`UploadMetrics` exports them at scrape time, summed over the uploaders of the
process. :class:`BridgeMetrics` counts what the bridge writes and rescans.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from rrb_streams.ops.metrics import Metrics
from rrb_streams.wire.entries import SCAN_EVENT, NewEntry

_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.25, 1.5, 2, 2.5, 5, 10, 30, 60, 300)


@dataclass(slots=True)
class UploadStats:
    """Counters of one uploader since it started."""

    entries_acked: int = 0  # every entry acknowledged, dead letters included
    puts: int = 0  # key states written
    deletes: int = 0  # absences recorded: latest object deleted, or a tombstone written
    coalesced: int = 0  # entries acknowledged without a write of their own
    unchanged: int = 0  # keys read and found as storage holds them already: no write
    dead_lettered: int = 0
    claimed: int = 0  # entries taken over from other consumers
    redone: int = 0  # keys written again because their lease ran out during the write
    segments: int = 0  # segment objects written (segments layout)
    segment_records: int = 0  # records in them
    segment_raw_bytes: int = 0  # their records' bytes before compression
    segment_bytes: int = 0  # their objects' bytes as stored


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
    ("rrb_upload_segments", "Segment objects written (segments layout).", "segments"),
    ("rrb_upload_segment_records", "Records written in segments.", "segment_records"),
    (
        "rrb_upload_segment_raw_bytes",
        "Bytes of the records written in segments, before compression.",
        "segment_raw_bytes",
    ),
    (
        "rrb_upload_segment_stored_bytes",
        "Bytes of the segment objects written, after compression.",
        "segment_bytes",
    ),
)

_RECORDS_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000)


class UploadMetrics:
    """The uploaders' metrics of one process: ``metrics.part(UploadMetrics)``."""

    def __init__(self, metrics: Metrics) -> None:
        self.lag = metrics.histogram(
            "rrb_upload_lag_seconds",
            "Seconds from a key's read from the source (the source's clock) to storage "
            "confirming its write (this host's clock).",
            buckets=_LAG_BUCKETS,
        )
        self.segment_records = metrics.histogram(
            "rrb_upload_records_per_segment",
            "Records per segment object written.",
            buckets=_RECORDS_BUCKETS,
        )
        self.last_write = metrics.gauge(
            "rrb_upload_last_write_timestamp_seconds",
            "Unix time at which storage last confirmed a batch's writes.",
        )
        self.newest_read = metrics.gauge(
            "rrb_backup_newest_read_timestamp_seconds",
            "Read time (source clock, Unix seconds) of the newest key state durable in "
            "storage: the recovery point. Alert when it falls behind.",
        )
        self._newest = 0
        self._stats: list[UploadStats] = []
        metrics.add_collector(_UploadCollector(self._stats))

    def track(self, stats: UploadStats) -> None:
        """Export ``stats`` (summed with any other tracked uploader's) as counters."""
        self._stats.append(stats)

    def stored(self, read_at_us: Sequence[int]) -> None:
        """Storage confirmed the writes of keys read at ``read_at_us`` (source clock, µs)."""
        now = time.time()
        observe = self.lag.observe
        for us in read_at_us:
            # Clocks of different hosts may disagree by a little: never a negative lag.
            observe(max(0.0, now - us / 1_000_000))
        self.last_write.set(now)
        newest = max(read_at_us, default=0)
        if newest > self._newest:
            self._newest = newest
            self.newest_read.set(newest / 1_000_000)


class _UploadCollector(Collector):
    """Reads the tracked uploaders' own counters at scrape time."""

    def __init__(self, stats: list[UploadStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, doc, attr in _UPLOAD_COUNTERS:
            yield CounterMetricFamily(name, doc, value=sum(getattr(s, attr) for s in self._stats))


class BridgeMetrics:
    """The bridge's metrics of one process: ``metrics.part(BridgeMetrics)``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.events = metrics.counter(
            "rrb_bridge_events", "Keyspace events written to the change stream."
        )
        self.rescan_entries = metrics.counter(
            "rrb_bridge_rescan_entries", "Entries written to the change stream by gap rescans."
        )
        self.rescans = metrics.counter(
            "rrb_bridge_rescans",
            "Gap rescans finished, by each reason that made them (one rescan may have several).",
            ["reason"],
        )

    def bridged(self, entries: Iterable[NewEntry]) -> None:
        """Count a batch of entries the bridge wrote to the stream."""
        total = rescanned = 0
        for entry in entries:
            total += 1
            rescanned += entry[2] == SCAN_EVENT
        self.events.inc(total - rescanned)
        self.rescan_entries.inc(rescanned)

    def rescanned(self, reasons: Iterable[str]) -> None:
        """Count one finished gap rescan under each of its reasons."""
        for reason in reasons:
            self.rescans.labels(reason).inc()

    def watch_leadership(self, leading: Callable[[], bool]) -> None:
        """Export ``rrb_bridge_leader``: 1 while ``leading()``, read at scrape time. A later
        call (the bridge run again) replaces the earlier callable."""
        gauge = self._metrics.gauge(
            "rrb_bridge_leader",
            "1 while this bridge holds the leader lease and writes, 0 while it stands by.",
        )
        gauge.set_function(lambda: 1.0 if leading() else 0.0)
