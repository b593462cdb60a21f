"""Compaction's Prometheus metrics (meanings: docs/operations.md)."""

from __future__ import annotations

from rrb_streams.compact.compactor import PassReport
from rrb_streams.format.manifest import SNAPSHOT_LEVEL, Manifest
from rrb_streams.ops.backup_state import level_label
from rrb_streams.ops.metrics import Metrics

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class CompactMetrics:
    """``metrics.part(CompactMetrics)``: one per process."""

    def __init__(self, metrics: Metrics) -> None:
        self.runs = metrics.counter(
            "rrb_compaction_runs",
            "Compaction passes, by result: done, standby (another process holds the lease), "
            "lost (another compactor committed first), failed.",
            ["result"],
        )
        self.inputs = metrics.counter("rrb_compaction_inputs", "Objects merged by compaction.")
        self.outputs = metrics.counter("rrb_compaction_outputs", "Objects compaction wrote.")
        self.bytes = metrics.counter(
            "rrb_compaction_bytes", "Bytes compaction read and wrote.", ["direction"]
        )
        self.deleted = metrics.counter(
            "rrb_compaction_deleted_objects", "Retired objects deleted after the grace period."
        )
        self.duration = metrics.histogram(
            "rrb_compaction_duration_seconds",
            "Seconds one compaction pass took.",
            buckets=_DURATION_BUCKETS,
        )
        self.objects = metrics.gauge(
            "rrb_backup_objects",
            "Objects the manifest names, by level (1, 2; snapshot: every kept snapshot's "
            "parts; 0: level-0 segments set aside as damaged), as of the last compaction.",
            ["level"],
        )
        self.object_bytes = metrics.gauge(
            "rrb_backup_bytes", "Bytes of those objects, by level.", ["level"]
        )

    def passed(self, report: PassReport, manifest: Manifest) -> None:
        self.runs.labels("lost" if report.lost else "done").inc()
        self.duration.observe(report.seconds)
        self.deleted.inc(report.deleted)
        for step in report.steps:
            self.inputs.inc(step.inputs)
            self.outputs.inc(step.outputs)
            self.bytes.labels("read").inc(step.bytes_in)
            self.bytes.labels("written").inc(step.bytes_out)
        counts: dict[str, list[int]] = {level_label(lv): [0, 0] for lv in (1, 2, SNAPSHOT_LEVEL)}
        for e in manifest.objects:
            c = counts.setdefault(level_label(e.level), [0, 0])
            c[0] += 1
            c[1] += e.size
        for label, (n, size) in counts.items():
            self.objects.labels(label).set(n)
            self.object_bytes.labels(label).set(size)
