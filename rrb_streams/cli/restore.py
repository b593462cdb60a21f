"""``rrb-restore``: a backup back into a Redis, resumably, latest or as of ``--at``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rrb_streams.attime import parse_at
from rrb_streams.cli import options
from rrb_streams.cli.common import (
    entry,
    execute,
    opened_storage,
    parser,
    redis_url,
    say,
    serve_observed,
    usage_error,
)
from rrb_streams.config import FORMATS, IF_EXISTS, RestoreConfig, default
from rrb_streams.errors import ConfigError
from rrb_streams.logs import configure, get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.ops.progress import Progress
from rrb_streams.restore.checks import require_backup, require_readable, require_versions
from rrb_streams.restore.planner import preview
from rrb_streams.restore.report import exit_status, render_preview, render_summary, summary_data
from rrb_streams.restore.run import Restorer
from rrb_streams.wire.urls import redact_url


def _config(args: argparse.Namespace) -> RestoreConfig:
    extra: dict[str, Any] = {}
    if args.consumer:
        extra["consumer"] = args.consumer
    return RestoreConfig(
        target_url=redis_url(args),
        storage=options.storage(args),
        stream_url=args.stream_url,
        path_prefix=args.path,
        concurrency=args.concurrency,
        at_us=None if args.at is None else parse_at(args.at),
        match=args.match,
        db=args.db,
        if_exists=args.if_exists,
        format=args.format,
        dry_run=args.dry_run,
        own_prefix=args.own_prefix,
        batch_size=args.batch_size,
        range_bytes=args.range_bytes,
        retry_timeout=args.retry_timeout,
        claim_idle=args.claim_idle,
        grace=args.grace,
        tls=options.tls(args),
        **extra,
    ).validate()


def _parser() -> argparse.ArgumentParser:
    p = parser(
        "rrb-restore",
        "Restore a backup into a Redis: every key's type, value and expiry, latest or as of "
        "--at. Running the same command again resumes; more processes may join.",
        "target Redis (default: $REDIS_SERVER, else redis://localhost:6379/0); a Redis "
        "Cluster node's URL means the whole cluster",
    )

    def option(*flags: str, field: str, **kw: Any) -> None:
        p.add_argument(*flags, default=default(RestoreConfig, field), **kw)

    options.add_storage(p)
    option(
        "-c",
        "--concurrency",
        field="concurrency",
        type=int,
        metavar="N",
        help="writers in this process: concurrent object fetches (default: %(default)s)",
    )
    p.add_argument(
        "--at",
        metavar="TIME",
        help="restore the state as of TIME: ISO-8601 (UTC unless it says otherwise) or Unix "
        "seconds; needs a --versioning backup",
    )
    option("--match", field="match", metavar="GLOB", help="restore only keys matching GLOB")
    p.add_argument(
        "--db",
        type=int,
        metavar="N",
        help="restore only what was backed up from db N, into the target URL's db "
        "(default: every key into the db it came from; a Redis Cluster has only db 0, so "
        "keys of other dbs fail there unless --db picks one)",
    )
    option(
        "--if-exists",
        field="if_exists",
        choices=IF_EXISTS,
        help="a key already in the target: replace it, skip it, or count it as failed "
        "(default: %(default)s)",
    )
    option(
        "--format",
        field="format",
        choices=FORMATS,
        help="legacy: objects of the original realtime-redis-backup (default: %(default)s)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (objects, keys, bytes, a sample) and write nothing",
    )
    p.add_argument("--json", action="store_true", help="print the summary (or plan) as JSON")
    options.add_stream(p, "the restore stream", "the target", "rrb's own keys")
    p.add_argument("--consumer", metavar="NAME", help="writer name (default: <hostname>-<pid>)")
    option(
        "--batch-size",
        field="batch_size",
        type=int,
        metavar="N",
        help="keys layout: objects per batch, a writer's unit of work and what a crash may "
        "redo (default: %(default)s)",
    )
    option(
        "--range-bytes",
        field="range_bytes",
        type=int,
        metavar="BYTES",
        help="segment layout: bytes of records per key range, a writer's unit of work and what a "
        "crash may redo (default: %(default)s)",
    )
    option(
        "--claim-idle",
        field="claim_idle",
        type=float,
        metavar="SECONDS",
        help="take over a dead writer's objects after this long (default: %(default)g)",
    )
    option(
        "--retry-timeout",
        field="retry_timeout",
        type=float,
        metavar="SECONDS",
        help="give up after failing this long without a success (default: %(default)g)",
    )
    option(
        "--grace",
        field="grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, time to finish in-flight objects (default: %(default)g)",
    )
    options.add_age(p, writes=False, reads=True)
    options.add_tls(p)
    options.add_metrics(p)
    return p


def restore(argv: Sequence[str] | None = None) -> int:
    """``rrb-restore``: replay stored objects into a Redis, resumably."""
    p = _parser()
    args = p.parse_args(argv)
    tty = sys.stderr.isatty() and not args.quiet
    configure(debug=args.debug, quiet=args.quiet, default_level="WARNING" if tty else "INFO")
    try:
        cfg = _config(args)
        where = options.metrics_endpoint(args)
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> int:
        log = get_logger("restore")
        async with opened_storage(cfg.storage, reading="restore") as storage:
            await require_backup(cfg, storage)
            await require_readable(cfg, storage)
            await require_versions(cfg, storage)
            if cfg.dry_run:
                plan = await preview(
                    cfg, storage, on_foreign=lambda n: log.debug("restore.foreign_object", object=n)
                )
                print(render_preview(plan, cfg, as_json=args.json))
                return 0
            restorers: list[Restorer] = []

            def build(metrics: Metrics | None) -> list[Restorer]:
                restorer = Restorer(
                    cfg, storage, progress=Progress(tty=tty, log=log), metrics=metrics
                )
                say(
                    [
                        f"[*] Restoring {cfg.storage.description}{cfg.path_prefix} into "
                        f"{redact_url(cfg.target_url)}",
                        f"[*] Run {restorer.run_id}; the same command resumes it or joins it",
                    ],
                    args.quiet,
                )
                restorers.append(restorer)
                return restorers

            await serve_observed(
                where,
                build,
                grace=cfg.grace,
                redis=[
                    ("target Redis", cfg.target_url),
                    ("stream Redis", cfg.effective_stream_url),
                ],
                tls=cfg.tls,
                storage=storage,
            )
        report = restorers[0].report
        if report is None:  # cancelled before the end: a second signal
            return 1
        if args.json:
            print(json.dumps(summary_data(report), indent=2))
        else:
            print(render_summary(report))
        return exit_status(report)

    return execute(p.prog, args.debug, body)


restore_main = entry(restore)
