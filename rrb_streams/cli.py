"""Command-line entry points: parse, set up logging, build a config, run.

Bad input prints one line naming the bad value and exits 2. An unreachable or refusing
dependency prints one line and exits 1. Neither prints a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import anyio

from rrb_streams import __version__
from rrb_streams.config import (
    FORMATS,
    IF_EXISTS,
    BridgeConfig,
    RestoreConfig,
    StatusConfig,
    UploadConfig,
    VerifyConfig,
)
from rrb_streams.errors import ConfigError, DependencyError, RrbError
from rrb_streams.logs import configure, get_logger
from rrb_streams.ops import observe
from rrb_streams.storage.url import (
    SSE_MODES,
    StorageSpec,
    open_storage,
    parse_storage_url,
    with_sse,
)
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.tls import TlsOptions
from rrb_streams.wire.urls import redact_url

DEFAULT_REDIS = "redis://localhost:6379/0"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """Parse ``args``; a ``LOG_LEVEL`` that names no level is bad input too."""
        parsed = super().parse_args(args, namespace)
        level = os.environ.get("LOG_LEVEL")
        if level and level.upper() not in logging.getLevelNamesMapping():
            sys.stderr.write(
                f"{self.prog}: error: invalid LOG_LEVEL {level!r}: "
                "expected DEBUG, INFO, WARNING or ERROR\n"
            )
            raise SystemExit(2)
        return parsed


def _parser(prog: str, description: str, url_help: str) -> _Parser:
    p = _Parser(prog=prog, description=description)
    p.add_argument("url", nargs="?", metavar="REDIS_URL", help=url_help)
    p.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _add_tls_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (rediss:// URLs)")
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM CA bundle to verify the server with (default: $REDIS_TLS_CA, else the "
        "system's CAs)",
    )
    g.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM client certificate, for servers that require one (default: $REDIS_TLS_CERT)",
    )
    g.add_argument(
        "--tls-key",
        metavar="FILE",
        help="PEM private key of --tls-cert (default: $REDIS_TLS_KEY, else in --tls-cert)",
    )


def _tls(args: argparse.Namespace) -> TlsOptions:
    return TlsOptions.from_sources(args.tls_ca, args.tls_cert, args.tls_key)


def _add_sse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--s3-sse",
        metavar="MODE",
        help=f"S3 server-side encryption of written objects: {' or '.join(SSE_MODES)} "
        "(default: $S3_SSE, else the bucket's default)",
    )
    p.add_argument(
        "--s3-sse-kms-key-id",
        metavar="ID",
        help="KMS key for --s3-sse aws:kms (default: $S3_SSE_KMS_KEY_ID, else the bucket's "
        "aws/s3 key)",
    )


def _writable_storage(args: argparse.Namespace) -> StorageSpec:
    return with_sse(parse_storage_url(args.storage), args.s3_sse, args.s3_sse_kms_key_id)


def _add_stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stream-url", metavar="URL", help="Redis holding the change stream (default: the source)"
    )
    p.add_argument(
        "--own-prefix",
        default="rrb:",
        metavar="PREFIX",
        help="prefix of rrb's own keys, never backed up (default: rrb:)",
    )


def _add_bridge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-r",
        "--redis-pattern",
        default="*",
        metavar="GLOB",
        help="back up only keys matching GLOB (default: *)",
    )
    p.add_argument(
        "--all-dbs", action="store_true", help="watch every database, not only the URL's"
    )
    p.add_argument(
        "--assume-notifications",
        action="store_true",
        help="do not touch CONFIG: notify-keyspace-events is already set (managed Redis)",
    )
    p.add_argument(
        "--leader-lease",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="of several bridges for one source, one leads; a standby takes over this long "
        "after the leader died (default: 10)",
    )


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    """``--storage`` and ``-P``: where the backup is, for every command that touches it."""
    p.add_argument(
        "--storage",
        metavar="URL",
        help="s3://bucket/prefix, file:///path or a path (default: $S3_BUCKET, else ./rrb-backup)",
    )
    p.add_argument("-P", "--path", default="", metavar="PREFIX", help="prefix of the object names")


def _add_upload_options(p: argparse.ArgumentParser, concurrency_help: str) -> None:
    _add_storage_options(p)
    p.add_argument("-c", "--concurrency", type=int, default=4, metavar="N", help=concurrency_help)
    p.add_argument(
        "--versioning",
        action="store_true",
        help="keep every change as its own object (needed for point-in-time restore)",
    )
    p.add_argument("--group", default="rrb-upload", help="consumer group (default: rrb-upload)")
    p.add_argument("--consumer", metavar="NAME", help="consumer name (default: <hostname>-<pid>)")
    p.add_argument(
        "--claim-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="claim another consumer's entries after they sat this long unacked (default: 30)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="per-key lease around read + write; after a crash its keys wait this long "
        "(default: 30)",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="how long a short batch waits to fill, so hot keys coalesce (default: 0.1)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        metavar="N",
        help="failures of one entry before it moves to the dead letters (default: 5)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, time to finish and ack in-flight work (default: 10)",
    )
    _add_sse_options(p)


def _source_url(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("REDIS_SERVER") or DEFAULT_REDIS)


def _bridge_config(args: argparse.Namespace) -> BridgeConfig:
    return BridgeConfig(
        source_url=_source_url(args),
        stream_url=args.stream_url,
        pattern=args.redis_pattern,
        all_dbs=args.all_dbs,
        own_prefix=args.own_prefix,
        assume_notifications=args.assume_notifications,
        leader_lease=args.leader_lease,
        tls=_tls(args),
    ).validate()


def _upload_config(args: argparse.Namespace, storage: StorageSpec) -> UploadConfig:
    extra: dict[str, Any] = {}
    if args.consumer:
        extra["consumer"] = args.consumer
    return UploadConfig(
        source_url=_source_url(args),
        storage=storage,
        stream_url=args.stream_url,
        path_prefix=args.path,
        concurrency=args.concurrency,
        versioning=args.versioning,
        group=args.group,
        own_prefix=args.own_prefix,
        claim_idle=args.claim_idle,
        lease=args.lease,
        linger=args.linger,
        max_attempts=args.max_attempts,
        grace=args.grace,
        tls=_tls(args),
        **extra,
    ).validate()


def _first_rrb_error(exc: BaseException) -> RrbError | None:
    """The first of our own errors inside ``exc``, looking through exception groups."""
    if isinstance(exc, RrbError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_rrb_error(inner)
            if found is not None:
                return found
    return None


def _execute(prog: str, debug: bool, body: Callable[[], Awaitable[int | None]]) -> int:
    """Run ``body`` under anyio; map errors to one line and an exit status.

    ``body`` may return the exit status; ``None`` means 0.
    """
    try:
        status = anyio.run(body)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        err = _first_rrb_error(exc)
        if debug:
            traceback.print_exception(exc)
        if err is None:
            sys.stderr.write(f"{prog}: unexpected error: {exc!r} (run with --debug for details)\n")
            return 1
        sys.stderr.write(f"{prog}: error: {err}\n")
        return 2 if isinstance(err, ConfigError) else 1
    return status or 0


def _usage_error(prog: str, exc: ConfigError) -> int:
    sys.stderr.write(f"{prog}: error: {exc}\n")
    return 2


def _say(lines: Sequence[str], quiet: bool) -> None:
    """The friendly start-up summary, on a terminal only (logs carry the same facts)."""
    if quiet or not sys.stderr.isatty():
        return
    for line in lines:
        sys.stderr.write(line + "\n")


def _storage_lines(spec: StorageSpec, prefix: str) -> list[str]:
    lines = [f"[*] Storage: {spec.description}"]
    if spec.defaulted:
        lines.append("    (no --storage and no S3_BUCKET: using the folder ./rrb-backup)")
    if prefix:
        lines.append(f"[*] Using base path: '{prefix}'")
    return lines


async def _open_checked_storage(spec: StorageSpec) -> Any:
    log = get_logger("storage")
    if spec.defaulted:
        log.warning("storage.default", path=str(spec.path), hint="set --storage or S3_BUCKET")
    storage = open_storage(spec)
    try:
        await storage.check()
    except BaseException:
        await storage.close()
        raise
    return storage


def bridge(argv: Sequence[str] | None = None) -> int:
    """``rrb-bridge``: copy keyspace notifications into the change stream."""
    p = _parser(
        "rrb-bridge",
        "Copy keyspace notifications of a Redis into a durable change stream.",
        "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    _add_stream_options(p)
    _add_bridge_options(p)
    _add_tls_options(p)
    observe.add_options(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=args.quiet)
    try:
        cfg = _bridge_config(args)
        where = observe.endpoint(args)
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> None:
        from rrb_streams.backup.bridge import Bridge
        from rrb_streams.service import serve

        metrics = observe.metrics_for(where)
        component = Bridge(cfg, metrics)
        async with observe.observing(
            where,
            metrics,
            redis=[("source Redis", cfg.source_url), ("stream Redis", cfg.effective_stream_url)],
            tls=cfg.tls,
            stream=(cfg.effective_stream_url, cfg.own),
        ):
            await serve(
                [component],
                grace=10.0,
                on_started=lambda: get_logger("bridge").info(
                    "bridge.started",
                    source=redact_url(cfg.source_url),
                    stream=redact_url(cfg.effective_stream_url),
                    pattern=cfg.pattern,
                    all_dbs=cfg.all_dbs,
                ),
            )

    return _execute(p.prog, args.debug, body)


def upload(argv: Sequence[str] | None = None) -> int:
    """``rrb-upload``: consume the change stream and write objects to storage."""
    p = _parser(
        "rrb-upload",
        "Read changed keys from the source and write them to storage, as one consumer group.",
        "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    _add_stream_options(p)
    _add_upload_options(p, "concurrent storage writes in this process (default: 4)")
    _add_tls_options(p)
    observe.add_options(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=args.quiet)
    try:
        cfg = _upload_config(args, _writable_storage(args))
        where = observe.endpoint(args)
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> None:
        from rrb_streams.backup.upload import Uploader
        from rrb_streams.service import serve

        storage = await _open_checked_storage(cfg.storage)
        try:
            metrics = observe.metrics_for(where)
            uploader = Uploader(cfg, storage, metrics)
            async with observe.observing(
                where,
                metrics,
                redis=[
                    ("source Redis", cfg.source_url),
                    ("stream Redis", cfg.effective_stream_url),
                ],
                tls=cfg.tls,
                storage=storage,
                stream=(cfg.effective_stream_url, cfg.own),
            ):
                await serve(
                    [uploader],
                    grace=cfg.grace,
                    on_started=lambda: get_logger("upload").info(
                        "upload.started",
                        storage=cfg.storage.description,
                        prefix=cfg.path_prefix,
                        consumer=cfg.consumer,
                        concurrency=cfg.concurrency,
                        versioning=cfg.versioning,
                    ),
                )
        finally:
            with anyio.CancelScope(shield=True):
                await storage.close()

    return _execute(p.prog, args.debug, body)


def rrb(argv: Sequence[str] | None = None) -> int:
    """``rrb``: the bridge and the uploaders in one process."""
    p = _parser(
        "rrb",
        "Back up every change of a Redis to S3 or a folder, in real time (bridge + uploaders).",
        "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    _add_stream_options(p)
    _add_bridge_options(p)
    _add_upload_options(p, "upload workers: concurrent storage writes (default: 4)")
    _add_tls_options(p)
    observe.add_options(p)
    args = p.parse_args(argv)
    # On a terminal the start-up summary speaks for rrb; routine logs would bury it.
    configure(
        debug=args.debug,
        quiet=args.quiet,
        default_level="WARNING" if sys.stderr.isatty() else "INFO",
    )
    try:
        bridge_cfg = _bridge_config(args)
        upload_cfg = _upload_config(args, _writable_storage(args))
        where = observe.endpoint(args)
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> None:
        from rrb_streams.backup.bridge import Bridge
        from rrb_streams.backup.upload import Uploader
        from rrb_streams.service import Component, serve

        lines = [f"[*] Connecting to Redis {redact_url(bridge_cfg.source_url)}..."]
        r = connect(bridge_cfg.source_url, tls=bridge_cfg.tls)
        try:
            await ping(r, bridge_cfg.source_url, "source Redis")
        finally:
            await r.aclose()
        lines[0] += "OK!"
        lines.append(f"[*] Using Redis pattern: '{bridge_cfg.pattern}'")
        lines += _storage_lines(upload_cfg.storage, upload_cfg.path_prefix)
        if upload_cfg.versioning:
            lines.append("[*] Versioning enabled: every change is kept")
        storage = await _open_checked_storage(upload_cfg.storage)
        try:
            metrics = observe.metrics_for(where)
            components: list[Component] = [
                Bridge(bridge_cfg, metrics),
                Uploader(upload_cfg, storage, metrics),
            ]

            def started() -> None:
                _say(
                    [
                        *lines,
                        f"[*] Started {upload_cfg.concurrency} upload workers "
                        f"as consumer {upload_cfg.consumer}",
                        "[*] Realtime Redis Backup is running. Ctrl-C or SIGTERM stops it.",
                    ],
                    args.quiet,
                )
                get_logger("rrb").info(
                    "rrb.started",
                    source=redact_url(bridge_cfg.source_url),
                    pattern=bridge_cfg.pattern,
                    storage=upload_cfg.storage.description,
                    prefix=upload_cfg.path_prefix,
                    versioning=upload_cfg.versioning,
                    workers=upload_cfg.concurrency,
                    consumer=upload_cfg.consumer,
                )

            async with observe.observing(
                where,
                metrics,
                redis=[
                    ("source Redis", bridge_cfg.source_url),
                    ("stream Redis", bridge_cfg.effective_stream_url),
                ],
                tls=bridge_cfg.tls,
                storage=storage,
                stream=(bridge_cfg.effective_stream_url, bridge_cfg.own),
            ):
                await serve(components, grace=upload_cfg.grace, on_started=started)
        finally:
            with anyio.CancelScope(shield=True):
                await storage.close()

    return _execute(p.prog, args.debug, body)


def status(argv: Sequence[str] | None = None) -> int:
    """``rrb-status``: stream length, pending, lag, consumers, dead letters."""
    p = _parser(
        "rrb-status",
        "Show the change stream: length, per-group pending and lag, consumers, dead letters.",
        "Redis holding the change stream (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    p.add_argument(
        "--own-prefix",
        default="rrb:",
        metavar="PREFIX",
        help="prefix of rrb's keys (default: rrb:)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_tls_options(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=True)
    try:
        cfg = StatusConfig(
            stream_url=_source_url(args),
            own_prefix=args.own_prefix,
            as_json=args.json,
            tls=_tls(args),
        ).validate()
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> int:
        from rrb_streams.ops.status import collect, render

        r = connect(cfg.stream_url, name="rrb-status", tls=cfg.tls)
        try:
            await ping(r, cfg.stream_url, "stream Redis")
            result = await collect(r, cfg.own)
        finally:
            await r.aclose()
        if cfg.as_json:
            print(result.to_json())
        elif result.exists:
            print(render(result))
        if result.exists:
            return 0
        # A monitor pointed at the wrong Redis, db or prefix must not read this as healthy.
        sys.stderr.write(
            f"{p.prog}: error: no change stream {result.stream!r} at "
            f"{redact_url(cfg.stream_url)} (no bridge has run against it, or the URL, db or "
            "--own-prefix is wrong)\n"
        )
        return 1

    return _execute(p.prog, args.debug, body)


def _restore_config(args: argparse.Namespace, storage: StorageSpec) -> RestoreConfig:
    from rrb_streams.attime import parse_at

    extra: dict[str, Any] = {}
    if args.consumer:
        extra["consumer"] = args.consumer
    return RestoreConfig(
        target_url=_source_url(args),
        storage=storage,
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
        retry_timeout=args.retry_timeout,
        claim_idle=args.claim_idle,
        grace=args.grace,
        tls=_tls(args),
        **extra,
    ).validate()


def restore(argv: Sequence[str] | None = None) -> int:
    """``rrb-restore``: replay stored objects into a Redis, resumably."""
    p = _parser(
        "rrb-restore",
        "Restore a backup into a Redis: every key's type, value and expiry, latest or as of "
        "--at. Running the same command again resumes; more processes may join.",
        "target Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    _add_storage_options(p)
    p.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="writers in this process: concurrent object fetches (default: 4)",
    )
    p.add_argument(
        "--at",
        metavar="TIME",
        help="restore the state as of TIME: ISO-8601 (UTC unless it says otherwise) or Unix "
        "seconds; needs a --versioning backup",
    )
    p.add_argument("--match", default="*", metavar="GLOB", help="restore only keys matching GLOB")
    p.add_argument(
        "--db",
        type=int,
        metavar="N",
        help="restore only what was backed up from db N, into the target URL's db "
        "(default: every key into the db it came from)",
    )
    p.add_argument(
        "--if-exists",
        choices=IF_EXISTS,
        default="replace",
        help="a key already in the target: replace it, skip it, or count it as failed "
        "(default: replace)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="rrb",
        help="legacy: objects of the original realtime-redis-backup (default: rrb)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (objects, keys, bytes, a sample) and write nothing",
    )
    p.add_argument("--json", action="store_true", help="print the summary (or plan) as JSON")
    p.add_argument(
        "--stream-url",
        metavar="URL",
        help="Redis holding the restore stream (default: the target)",
    )
    p.add_argument(
        "--own-prefix",
        default="rrb:",
        metavar="PREFIX",
        help="prefix of rrb's own keys (default: rrb:)",
    )
    p.add_argument("--consumer", metavar="NAME", help="writer name (default: <hostname>-<pid>)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=200,
        metavar="N",
        help="objects per batch: a writer's unit of work, and what a crash may redo (default: 200)",
    )
    p.add_argument(
        "--claim-idle",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="take over a dead writer's objects after this long (default: 15)",
    )
    p.add_argument(
        "--retry-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up after failing this long without a success (default: 60)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, time to finish in-flight objects (default: 10)",
    )
    _add_tls_options(p)
    observe.add_options(p)
    args = p.parse_args(argv)
    tty = sys.stderr.isatty() and not args.quiet
    configure(debug=args.debug, quiet=args.quiet, default_level="WARNING" if tty else "INFO")
    try:
        cfg = _restore_config(args, parse_storage_url(args.storage))
        where = observe.endpoint(args)
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> int:
        from rrb_streams.ops.progress import Progress
        from rrb_streams.restore.planner import preview
        from rrb_streams.restore.report import (
            exit_status,
            render_preview,
            render_summary,
            summary_data,
        )
        from rrb_streams.restore.run import Restorer, require_backup, require_versions
        from rrb_streams.service import serve

        log = get_logger("restore")
        folder = cfg.storage.path
        if folder is not None and not await anyio.Path(folder).exists():
            # Upload creates a missing folder; a restore from one is a mistyped path.
            raise DependencyError(f"storage folder {folder} does not exist: nothing to restore")
        storage = await _open_checked_storage(cfg.storage)
        try:
            await require_backup(cfg, storage)
            await require_versions(cfg, storage)
            if cfg.dry_run:
                plan = await preview(
                    cfg, storage, on_foreign=lambda n: log.debug("restore.foreign_object", object=n)
                )
                print(render_preview(plan, cfg, as_json=args.json))
                return 0
            metrics = observe.metrics_for(where)
            restorer = Restorer(cfg, storage, progress=Progress(tty=tty, log=log), metrics=metrics)
            _say(
                [
                    f"[*] Restoring {cfg.storage.description}{cfg.path_prefix} into "
                    f"{redact_url(cfg.target_url)}",
                    f"[*] Run {restorer.run_id}; the same command resumes it or joins it",
                ],
                args.quiet,
            )
            async with observe.observing(
                where,
                metrics,
                redis=[
                    ("target Redis", cfg.target_url),
                    ("stream Redis", cfg.effective_stream_url),
                ],
                tls=cfg.tls,
                storage=storage,
            ):
                await serve([restorer], grace=cfg.grace)
        finally:
            with anyio.CancelScope(shield=True):
                await storage.close()
        report = restorer.report
        if report is None:  # cancelled before the end: a second signal
            return 1
        if args.json:
            print(json.dumps(summary_data(report), indent=2))
        else:
            print(render_summary(report))
        return exit_status(report)

    return _execute(p.prog, args.debug, body)


def verify(argv: Sequence[str] | None = None) -> int:
    """``rrb-verify``: compare the live keys with the latest objects in storage."""
    p = _parser(
        "rrb-verify",
        "Compare every live key with its latest object in storage: missing, stale and extra "
        "objects. Exit status 0 only when all three are 0, 3 when differences were found.",
        "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    _add_storage_options(p)
    p.add_argument("--match", default="*", metavar="GLOB", help="check only keys matching GLOB")
    p.add_argument(
        "--all-dbs", action="store_true", help="check every database, not only the URL's"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--repair",
        action="store_true",
        help="queue every difference in the change stream, so the uploaders fix it",
    )
    p.add_argument(
        "--recheck-delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="wait before checking a difference again; keys that change meanwhile are not "
        "counted (default: 2)",
    )
    _add_stream_options(p)
    _add_tls_options(p)
    args = p.parse_args(argv)
    tty = sys.stderr.isatty() and not args.quiet
    configure(debug=args.debug, quiet=args.quiet, default_level="WARNING" if tty else "INFO")
    try:
        cfg = VerifyConfig(
            source_url=_source_url(args),
            storage=parse_storage_url(args.storage),
            stream_url=args.stream_url,
            path_prefix=args.path,
            match=args.match,
            all_dbs=args.all_dbs,
            own_prefix=args.own_prefix,
            repair=args.repair,
            recheck_delay=args.recheck_delay,
            tls=_tls(args),
        ).validate()
    except ConfigError as exc:
        return _usage_error(p.prog, exc)

    async def body() -> int:
        from rrb_streams.ops.progress import Progress
        from rrb_streams.verify.report import exit_status, render
        from rrb_streams.verify.verifier import Verifier

        log = get_logger("verify")
        folder = cfg.storage.path
        if folder is not None and not await anyio.Path(folder).exists():
            raise DependencyError(f"storage folder {folder} does not exist: nothing to verify")
        storage = await _open_checked_storage(cfg.storage)
        try:
            verifier = Verifier(
                cfg,
                storage,
                progress=lambda unit: Progress(
                    tty=tty, log=log, event="verify.progress", unit=unit
                ),
            )
            summary = await verifier.run()
        finally:
            with anyio.CancelScope(shield=True):
                await storage.close()
        if args.json:
            print(json.dumps(summary.to_dict(repair=cfg.repair), indent=2))
        else:
            print(render(summary, repair=cfg.repair))
        return exit_status(summary)

    return _execute(p.prog, args.debug, body)


def _entry(fn: Callable[[Sequence[str] | None], int]) -> Callable[[], NoReturn]:
    def main() -> NoReturn:
        sys.exit(fn(sys.argv[1:]))

    return main


bridge_main = _entry(bridge)
upload_main = _entry(upload)
rrb_main = _entry(rrb)
status_main = _entry(status)
restore_main = _entry(restore)
verify_main = _entry(verify)
