"""``rrb-compact``: one compaction pass now, for cron, a Kubernetes CronJob or a systemd timer."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rrb_streams.cli import options
from rrb_streams.cli.common import (
    entry,
    execute,
    found_clusters,
    opened_storage,
    parser,
    redis_url,
    usage_error,
)
from rrb_streams.compact.service import compact_once
from rrb_streams.errors import ConfigError
from rrb_streams.logs import configure, get_logger
from rrb_streams.wire.connections import ping
from rrb_streams.wire.slot_client import connect_own


def compact(argv: Sequence[str] | None = None) -> int:
    """``rrb-compact``: merge, snapshot and apply retention as due, then exit."""
    p = parser(
        "rrb-compact",
        "Run one compaction pass over a segment-layout backup: merge what is due, take a "
        "snapshot when due, apply retention, delete what was retired. Exits 0 when done or "
        "when another process holds the compaction lease (3 with --strict).",
        "Redis holding the compaction lease: the change stream's Redis "
        "(default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    options.add_storage(p)
    options.add_own_prefix(p, "rrb's keys (the lease)")
    options.add_compaction(p, automatic=False)
    options.add_age(p, writes=True, reads=True)
    p.add_argument("--snapshot", action="store_true", help="take a snapshot now, whatever is due")
    p.add_argument(
        "--strict", action="store_true", help="exit 3 when another process holds the lease"
    )
    p.add_argument("--json", action="store_true", help="print what the pass did as JSON")
    options.add_tls(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=args.quiet or args.json)
    try:
        spec = options.storage(args, rewrites=True)
        cfg = options.compaction(args, redis_url(args), args.path, as_json=args.json)
    except ConfigError as exc:
        return usage_error(p.prog, exc)
    log = get_logger("compact")

    async def body() -> int:
        found = await found_clusters(cfg)
        r = connect_own(found.stream_url, found.own, name="rrb-compact", tls=cfg.tls)
        try:
            await ping(r, cfg.stream_url, "stream Redis")
            async with opened_storage(spec, reading="compact") as storage:
                report = await compact_once(found, storage, r, log, snapshot=args.snapshot)
        finally:
            await r.aclose()
        if report is None:
            if cfg.as_json:
                print(json.dumps({"standby": True}))
            else:
                sys.stderr.write(f"{p.prog}: another process holds the compaction lease\n")
            return 3 if args.strict else 0
        if cfg.as_json:
            print(json.dumps(report.to_dict(), indent=2))
        elif not args.quiet:
            for step in report.steps:
                print(
                    f"{step.step}: {step.inputs} objects ({step.records_in} records) into "
                    f"{step.outputs} ({step.records_out} records) in {step.seconds:.1f} s"
                )
            print(
                f"manifest {report.seq}: {report.retired} retired, {report.deleted} deleted, "
                f"{len(report.damaged)} damaged, {report.seconds:.1f} s"
            )
        for name, reason in report.damaged:
            sys.stderr.write(f"{p.prog}: damaged input left as it is: {name}: {reason}\n")
        return 1 if report.lost or report.damaged else 0

    return execute(p.prog, args.debug, body)


compact_main = entry(compact)
