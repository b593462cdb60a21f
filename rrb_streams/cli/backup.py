"""The backup commands: ``rrb-bridge``, ``rrb-upload``, and ``rrb``, which runs both."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.upload import Uploader
from rrb_streams.cli import options
from rrb_streams.cli.common import (
    entry,
    execute,
    found_clusters,
    opened_storage,
    parser,
    redis_url,
    say,
    serve_observed,
    storage_lines,
    usage_error,
)
from rrb_streams.compact.service import AutoCompactor
from rrb_streams.config import BridgeConfig, CompactConfig, UploadConfig
from rrb_streams.crypt.keys import AgeKeys
from rrb_streams.errors import ConfigError
from rrb_streams.logs import configure, get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.service import Component
from rrb_streams.storage.base import Storage
from rrb_streams.wire.urls import redact_url

_SOURCE_HELP = "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)"


def _bridge_config(args: argparse.Namespace) -> BridgeConfig:
    return BridgeConfig(
        source_url=redis_url(args),
        stream_url=args.stream_url,
        pattern=args.redis_pattern,
        all_dbs=args.all_dbs,
        own_prefix=args.own_prefix,
        assume_notifications=args.assume_notifications,
        leader_lease=args.leader_lease,
        tls=options.tls(args),
    ).validate()


def _upload_config(args: argparse.Namespace) -> UploadConfig:
    extra: dict[str, Any] = {}
    if args.consumer:
        extra["consumer"] = args.consumer
    return UploadConfig(
        source_url=redis_url(args),
        stream_url=args.stream_url,
        path_prefix=args.path,
        concurrency=args.concurrency,
        layout=args.layout,
        segment_interval=args.segment_interval,
        segment_bytes=args.segment_bytes,
        versioning=args.versioning,
        group=args.group,
        own_prefix=args.own_prefix,
        claim_idle=args.claim_idle,
        lease=args.lease,
        linger=args.linger,
        max_attempts=args.max_attempts,
        grace=args.grace,
        tls=options.tls(args),
        **extra,
    ).validate()


def _compact_config(args: argparse.Namespace, upload: UploadConfig, keys: AgeKeys) -> CompactConfig:
    cfg = options.compaction(args, upload.effective_stream_url, upload.path_prefix)
    if cfg.enabled and upload.layout == "segments" and keys.recipients and not keys.identities:
        # Compaction reads what it merges: an uploader holding only public keys cannot.
        get_logger("compact").warning(
            "compaction.off",
            reason="objects are encrypted and no --age-identity was given",
            hint="run rrb-compact where the identity is, or give this process --age-identity",
        )
        return replace(cfg, enabled=False)
    return cfg


def _uploaders(
    cfg: UploadConfig, compact: CompactConfig, storage: Storage, metrics: Metrics | None
) -> list[Component]:
    """The uploader and, with the segment layout, automatic compaction beside it."""
    out: list[Component] = [Uploader(cfg, storage, metrics)]
    if cfg.layout == "segments" and compact.enabled:
        out.append(AutoCompactor(compact, storage, metrics))
    return out


def _observed(cfg: BridgeConfig | UploadConfig) -> dict[str, Any]:
    """For :func:`serve_observed`: the source and the stream Redis that ``/readyz`` pings,
    and the change stream whose gauges are polled."""
    return {
        "redis": [("source Redis", cfg.source_url), ("stream Redis", cfg.effective_stream_url)],
        "tls": cfg.tls,
        "stream": (cfg.effective_stream_url, cfg.own),
    }


def bridge(argv: Sequence[str] | None = None) -> int:
    """``rrb-bridge``: copy keyspace notifications into the change stream."""
    p = parser(
        "rrb-bridge",
        "Copy keyspace notifications of a Redis into a durable change stream.",
        _SOURCE_HELP,
    )
    options.add_stream(p)
    options.add_bridge(p)
    options.add_tls(p)
    options.add_metrics(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=args.quiet)
    try:
        cfg = _bridge_config(args)
        where = options.metrics_endpoint(args)
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> None:
        found = await found_clusters(cfg)
        await serve_observed(
            where,
            lambda metrics: [Bridge(found, metrics)],
            grace=cfg.grace,
            **_observed(found),
            on_started=lambda: get_logger("bridge").info(
                "bridge.started",
                source=redact_url(cfg.source_url),
                stream=redact_url(cfg.effective_stream_url),
                pattern=cfg.pattern,
                all_dbs=cfg.all_dbs,
            ),
        )

    return execute(p.prog, args.debug, body)


def upload(argv: Sequence[str] | None = None) -> int:
    """``rrb-upload``: consume the change stream and write objects to storage."""
    p = parser(
        "rrb-upload",
        "Read changed keys from the source and write them to storage, as one consumer group.",
        _SOURCE_HELP,
    )
    options.add_stream(p)
    options.add_upload(p, "concurrent storage writes in this process (default: %(default)s)")
    options.add_compaction(p, automatic=True)
    options.add_age(p, writes=True, reads=True)
    options.add_tls(p)
    options.add_metrics(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=args.quiet)
    try:
        spec = options.writable_storage(args, rewrites=True)
        cfg = _upload_config(args)
        compact_cfg = _compact_config(args, cfg, spec.age)
        where = options.metrics_endpoint(args)
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> None:
        async with opened_storage(spec) as storage:
            found = await found_clusters(cfg)
            compact = await found_clusters(compact_cfg)
            await serve_observed(
                where,
                lambda metrics: _uploaders(found, compact, storage, metrics),
                grace=cfg.grace,
                storage=storage,
                **_observed(found),
                on_started=lambda: get_logger("upload").info(
                    "upload.started",
                    storage=spec.description,
                    prefix=cfg.path_prefix,
                    consumer=cfg.consumer,
                    concurrency=cfg.concurrency,
                    layout=cfg.layout,
                    versioning=cfg.versioning,
                ),
            )

    return execute(p.prog, args.debug, body)


def rrb(argv: Sequence[str] | None = None) -> int:
    """``rrb``: the bridge and the uploaders in one process."""
    p = parser(
        "rrb",
        "Back up every change of a Redis to S3 or a folder, in real time (bridge + uploaders).",
        _SOURCE_HELP,
    )
    options.add_stream(p)
    options.add_bridge(p)
    options.add_upload(p, "upload workers: concurrent storage writes (default: %(default)s)")
    options.add_compaction(p, automatic=True)
    options.add_age(p, writes=True, reads=True)
    options.add_tls(p)
    options.add_metrics(p)
    args = p.parse_args(argv)
    # On a terminal the start-up summary speaks for rrb; routine logs would bury it.
    configure(
        debug=args.debug,
        quiet=args.quiet,
        default_level="WARNING" if sys.stderr.isatty() else "INFO",
    )
    try:
        bridge_cfg = _bridge_config(args)
        spec = options.writable_storage(args, rewrites=True)
        upload_cfg = _upload_config(args)
        compact_cfg = _compact_config(args, upload_cfg, spec.age)
        where = options.metrics_endpoint(args)
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> None:
        lines = [f"[*] Connecting to Redis {redact_url(bridge_cfg.source_url)}..."]
        bridging = await found_clusters(bridge_cfg)  # reaches the source, or says why not
        lines[0] += "OK!"
        uploading = await found_clusters(upload_cfg)
        compacting = await found_clusters(compact_cfg)
        if bridging.source_cluster:
            lines[0] += " (a Redis Cluster: every master is backed up)"
        lines.append(f"[*] Using Redis pattern: '{bridge_cfg.pattern}'")
        lines += storage_lines(spec, upload_cfg.path_prefix)
        if spec.age.recipients:
            lines.append(
                "[*] Encrypting with age to "
                + ", ".join(r.fingerprint for r in spec.age.recipients)
                + ("" if compact_cfg.enabled else "; compaction is rrb-compact's job (no identity)")
            )
        if upload_cfg.layout == "segments":
            lines.append(
                f"[*] Layout: segments, one every {upload_cfg.segment_interval:g} s; "
                f"every change of the last {options.duration_text(compact_cfg.retention)} is kept"
            )
        elif upload_cfg.versioning:
            lines.append("[*] Layout: keys, versioning enabled: every change is kept")
        else:
            lines.append("[*] Layout: keys, one object per key")

        def started() -> None:
            say(
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
                storage=spec.description,
                prefix=upload_cfg.path_prefix,
                layout=upload_cfg.layout,
                versioning=upload_cfg.versioning,
                workers=upload_cfg.concurrency,
                consumer=upload_cfg.consumer,
            )

        async with opened_storage(spec) as storage:

            def build(metrics: Metrics | None) -> list[Component]:
                return [
                    Bridge(bridging, metrics),
                    *_uploaders(uploading, compacting, storage, metrics),
                ]

            await serve_observed(
                where,
                build,
                grace=upload_cfg.grace,
                storage=storage,
                **_observed(bridging),
                on_started=started,
            )

    return execute(p.prog, args.debug, body)


bridge_main = entry(bridge)
upload_main = entry(upload)
rrb_main = entry(rrb)
