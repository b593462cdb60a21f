"""What ``rrb-restore`` prints when it ends: the summary, the dry-run plan, the exit status.

Exit status: 0 when the run finished and nothing failed; 3 when it finished and some objects
failed (they are named); 1 when it stopped before the end (an outage outlasted the retries,
or a signal): running the same command again resumes. Bad input exits 2.
"""

from __future__ import annotations

import json
from typing import Any

from rrb_streams.config import RestoreConfig
from rrb_streams.restore.planner import Preview
from rrb_streams.restore.run import Report
from rrb_streams.restore.writer import OUTCOMES

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_FAILED_OBJECTS = 3
FAILURES_SHOWN = 20


def exit_status(report: Report) -> int:
    if not report.finished:
        return EXIT_STOPPED
    return EXIT_FAILED_OBJECTS if report.failed else EXIT_OK


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _keys(n: int) -> str:
    return f"{n:,} key" if n == 1 else f"{n:,} keys"


def summary_data(report: Report) -> dict[str, Any]:
    """The summary as data (``--json``): the run's totals when this process finished it."""
    s = report.stats
    mine = dict(s.outcomes)
    data: dict[str, Any] = {
        "run": report.run,
        "finished": report.finished,
        "resumed": report.resumed,
        "this_process": {
            **mine,
            "bytes": s.bytes,
            "claimed": s.claimed,
            "seconds": round(s.seconds, 3),
            "keys_per_second": round(mine["restored"] / s.seconds) if s.seconds > 0 else 0,
        },
    }
    t = report.totals
    if t is not None:
        data["run_totals"] = {
            **{name: t[name] for name in OUTCOMES},
            "absent": t["absent"] + t["absent_planned"],
            "bytes": t["bytes"],
            "objects_listed": t["listed"],
            "foreign_objects": t["foreign"],
        }
        data["failures"] = [{"object": n, "reason": r} for n, r in t.failures]
    return data


def render_summary(report: Report) -> str:
    """The closing summary, for people."""
    d = summary_data(report)
    mine = d["this_process"]
    lines = []
    totals = d.get("run_totals")
    if totals is not None:
        lines.append(
            f"Restore finished: {_keys(totals['restored'])} restored ({_size(totals['bytes'])})"
        )
        counts = totals
    elif report.finished:
        lines.append("Restore finished (by another process of the run); this process:")
        counts = mine
    else:
        lines.append(
            f"Restore stopped before the end; this process restored {_keys(mine['restored'])}. "
            "Run the same command again to resume."
        )
        counts = mine
    lines.append(
        f"  skipped: {counts['expired']:,} expired, {counts['filtered']:,} filtered, "
        f"{counts['existing']:,} existing, {counts['absent']:,} absent"
    )
    lines.append(f"  failed: {counts['failed']:,}")
    lines += [f"    {f['object']}: {f['reason']}" for f in d.get("failures", [])[:FAILURES_SHOWN]]
    if totals is not None and totals["failed"] > FAILURES_SHOWN:
        lines.append(f"    … and {totals['failed'] - FAILURES_SHOWN:,} more (see the log)")
    if totals is not None and totals["foreign_objects"]:
        lines.append(f"  ignored: {totals['foreign_objects']:,} objects that are not rrb objects")
    lines.append(
        f"  this process: {_keys(mine['restored'])} in {mine['seconds']:.1f} s, "
        f"{mine['keys_per_second']:,} keys/s"
        + (f" (resumed run {report.run})" if report.resumed else "")
    )
    return "\n".join(lines)


def render_preview(preview: Preview, cfg: RestoreConfig, *, as_json: bool) -> str:
    """The ``--dry-run`` plan."""
    st = preview.stats
    data = {
        "dry_run": True,
        "objects_listed": st.listed,
        "foreign_objects": st.foreign,
        "keys": st.keys,
        "bytes": st.bytes,
        "absent": st.absent,
        "segments": preview.segments,
        "damaged_segments": preview.damaged,
        "segment_records": preview.records,
        "key_ranges": preview.ranges,
        "sample": preview.sample,
    }
    if as_json:
        return json.dumps(data, indent=2)
    lines = [
        "Dry run: nothing is written.",
        f"  storage: {cfg.storage.description}  prefix: '{cfg.path_prefix}'",
        f"  objects listed: {st.listed:,}"
        + (f" ({st.foreign:,} not rrb objects, ignored)" if st.foreign else ""),
        f"  keys to restore: {st.keys:,} ({_size(st.bytes)})"
        + ("; --match applies as objects are read" if cfg.match != "*" else ""),
    ]
    if preview.segments or preview.damaged:
        lines.append(
            f"  segments: {preview.segments:,}, {preview.records:,} records to read in "
            f"{preview.ranges:,} key ranges ({_size(preview.range_bytes)} to fetch)"
            + (f"; {preview.damaged:,} with a damaged index" if preview.damaged else "")
        )
    if st.absent:
        lines.append(f"  left out: {st.absent:,} keys deleted, or with nothing at or before --at")
    if preview.sample:
        lines.append("  sample:")
        lines += [f"    {name}" for name in preview.sample]
    return "\n".join(lines)
