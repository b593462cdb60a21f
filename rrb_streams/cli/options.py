"""The option groups that several commands share, and reading them back.

Every default comes from the settings classes (:func:`rrb_streams.config.default`); help texts
show it with ``%(default)s``, so the help can never disagree with what runs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

from rrb_streams.config import (
    LAYOUTS,
    BridgeConfig,
    CompactConfig,
    UploadConfig,
    default,
    parse_duration,
)
from rrb_streams.crypt.keys import IDENTITY_FILE_ENV, RECIPIENTS_ENV, AgeKeys, age_keys
from rrb_streams.errors import ConfigError
from rrb_streams.ops import observe
from rrb_streams.storage.url import SSE_MODES, StorageSpec, parse_storage_url, with_sse
from rrb_streams.wire.keys import DEFAULT_OWN_PREFIX
from rrb_streams.wire.tls import TlsOptions


def add_tls(p: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert`` and ``--tls-key``, for ``rediss://`` URLs."""
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


def tls(args: argparse.Namespace) -> TlsOptions:
    """The TLS options, over their environment variables."""
    return TlsOptions.from_sources(args.tls_ca, args.tls_cert, args.tls_key)


def add_metrics(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host``."""
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port",
        metavar="PORT",
        help=f"serve /metrics, /healthz and /readyz on PORT (default: ${observe.PORT_ENV}, "
        "else off)",
    )
    g.add_argument(
        "--metrics-host",
        metavar="HOST",
        help=f"address to serve them on (default: ${observe.HOST_ENV}, else "
        f"{observe.DEFAULT_HOST})",
    )


def metrics_endpoint(args: argparse.Namespace) -> observe.Endpoint | None:
    """Where to serve the metrics; ``None`` when off. Raises ``ConfigError``."""
    return observe.endpoint(args.metrics_port, args.metrics_host)


def add_storage(p: argparse.ArgumentParser) -> None:
    """``--storage`` and ``-P``: where the backup is, for every command that touches it."""
    p.add_argument(
        "--storage",
        metavar="URL",
        help="s3://bucket/prefix, file:///path or a path (default: $S3_BUCKET, else ./rrb-backup)",
    )
    p.add_argument("-P", "--path", default="", metavar="PREFIX", help="prefix of the object names")


def add_sse(p: argparse.ArgumentParser) -> None:
    """``--s3-sse`` and ``--s3-sse-kms-key-id``, for commands that write objects."""
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


def add_age(p: argparse.ArgumentParser, *, writes: bool, reads: bool) -> None:
    """The age options: recipients for commands that write objects, an identity file for
    commands that read them."""
    g = p.add_argument_group("client-side encryption (age)")
    if writes:
        g.add_argument(
            "--age-recipient",
            action="append",
            default=[],
            metavar="KEY",
            help="encrypt every object written to this age1… public key; repeat for several "
            f"(default: ${RECIPIENTS_ENV}, else no encryption)",
        )
        g.add_argument(
            "--age-recipients-file",
            action="append",
            default=[],
            metavar="FILE",
            help="encrypt to every age1… recipient in FILE, one per line",
        )
    if reads:
        g.add_argument(
            "--age-identity",
            metavar="FILE",
            help="age identity file (AGE-SECRET-KEY-1… lines) to decrypt objects with "
            f"(default: ${IDENTITY_FILE_ENV})",
        )


def age(args: argparse.Namespace, *, rewrites: bool = False) -> AgeKeys:
    """The keys of :func:`add_age`'s options, over their environment variables.

    ``rewrites``: the command decrypts objects and writes them again (compaction, verify
    --repair). With an identity it must then have recipients too, or it would store what it
    rewrites unencrypted. Raises ``ConfigError``.
    """
    writes = hasattr(args, "age_recipient")
    reads = hasattr(args, "age_identity")
    env = {
        k: v
        for k, v in os.environ.items()
        if (k == RECIPIENTS_ENV and writes) or (k == IDENTITY_FILE_ENV and reads)
    }
    keys = age_keys(
        getattr(args, "age_recipient", ()),
        getattr(args, "age_recipients_file", ()),
        getattr(args, "age_identity", None),
        env,
    )
    if rewrites and keys.identities and not keys.recipients:
        raise ConfigError(
            "--age-identity without --age-recipient: what this command rewrites would be "
            f"stored unencrypted; give the writers' recipients too (or ${RECIPIENTS_ENV})"
        )
    return keys


def storage(args: argparse.Namespace, *, rewrites: bool = False) -> StorageSpec:
    """The storage ``--storage`` names (over ``S3_BUCKET``), seen through the age keys of
    :func:`add_age`'s options when the command has them. Raises ``ConfigError``."""
    return replace(parse_storage_url(args.storage), age=age(args, rewrites=rewrites))


def writable_storage(args: argparse.Namespace, *, rewrites: bool = False) -> StorageSpec:
    """:func:`storage` with the server-side encryption options. Raises ``ConfigError``."""
    return with_sse(storage(args, rewrites=rewrites), args.s3_sse, args.s3_sse_kms_key_id)


def add_own_prefix(
    p: argparse.ArgumentParser, what: str = "rrb's own keys, never backed up"
) -> None:
    """``--own-prefix``: where rrb's own keys live."""
    p.add_argument(
        "--own-prefix",
        default=DEFAULT_OWN_PREFIX,
        metavar="PREFIX",
        help=f"prefix of {what} (default: %(default)s)",
    )


def add_stream(
    p: argparse.ArgumentParser,
    holding: str = "the change stream",
    otherwise: str = "the source",
    own: str = "rrb's own keys, never backed up",
) -> None:
    """``--stream-url`` and ``--own-prefix``."""
    p.add_argument(
        "--stream-url", metavar="URL", help=f"Redis holding {holding} (default: {otherwise})"
    )
    add_own_prefix(p, own)


def add_bridge(p: argparse.ArgumentParser) -> None:
    """The bridge's options: what to watch, and its leader lease."""
    p.add_argument(
        "-r",
        "--redis-pattern",
        default=default(BridgeConfig, "pattern"),
        metavar="GLOB",
        help="back up only keys matching GLOB (default: %(default)s)",
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
        default=default(BridgeConfig, "leader_lease"),
        metavar="SECONDS",
        help="of several bridges for one source, one leads; a standby takes over this long "
        "after the leader died (default: %(default)g)",
    )


def add_upload(p: argparse.ArgumentParser, concurrency_help: str) -> None:
    """The uploaders' options: storage, object names, the group, and the retry policy."""

    def option(*flags: str, field: str, **kw: Any) -> None:
        p.add_argument(*flags, default=default(UploadConfig, field), **kw)

    add_storage(p)
    option("-c", "--concurrency", field="concurrency", type=int, metavar="N", help=concurrency_help)
    option(
        "--layout",
        field="layout",
        choices=LAYOUTS,
        help="segments: the records of many keys per object, every read kept, point-in-time "
        "restore built in; keys: one object per key, replaced on each change "
        "(default: %(default)s)",
    )
    option(
        "--segment-interval",
        field="segment_interval",
        type=float,
        metavar="SECONDS",
        help="segments layout: write one segment per this long, sooner when "
        "--segment-bytes is reached (default: %(default)g)",
    )
    option(
        "--segment-bytes",
        field="segment_bytes",
        type=int,
        metavar="BYTES",
        help="segments layout: payload bytes that close a segment early (default: %(default)s)",
    )
    p.add_argument(
        "--versioning",
        action="store_true",
        help="keys layout: keep every change as its own object (point-in-time restore)",
    )
    option("--group", field="group", help="consumer group (default: %(default)s)")
    p.add_argument("--consumer", metavar="NAME", help="consumer name (default: <hostname>-<pid>)")
    option(
        "--claim-idle",
        field="claim_idle",
        type=float,
        metavar="SECONDS",
        help="claim another consumer's entries after they sat this long unacked "
        "(default: %(default)g)",
    )
    option(
        "--lease",
        field="lease",
        type=float,
        metavar="SECONDS",
        help="per-key lease around read + write; after a crash its keys wait this long "
        "(default: %(default)g)",
    )
    option(
        "--linger",
        field="linger",
        type=float,
        metavar="SECONDS",
        help="how long a short batch waits to fill, so hot keys coalesce (default: %(default)g)",
    )
    option(
        "--max-attempts",
        field="max_attempts",
        type=int,
        metavar="N",
        help="failures of one entry before it moves to the dead letters (default: %(default)s)",
    )
    option(
        "--grace",
        field="grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, time to finish and ack in-flight work (default: %(default)g)",
    )
    add_sse(p)


def add_compaction(p: argparse.ArgumentParser, *, automatic: bool) -> None:
    """Retention and the compaction schedule; ``automatic`` adds ``--no-compaction``."""
    g = p.add_argument_group("compaction and retention (segments layout)")

    def duration(flag: str, field: str, text: str) -> None:
        g.add_argument(
            flag,
            default=None,
            metavar="DURATION",
            help=f"{text} (default: {duration_text(default(CompactConfig, field))})",
        )

    duration(
        "--retention",
        "retention",
        "history kept exactly: --at works for any moment this far back; older states "
        "collapse into a snapshot",
    )
    duration("--level1-every", "level1_every", "merge new segments into level 1 this often")
    duration("--level2-every", "level2_every", "merge level 1 into level 2 this often")
    duration("--snapshot-every", "snapshot_every", "write a snapshot this often")
    duration(
        "--compaction-grace",
        "grace",
        "time a merged object stays readable before it is deleted",
    )
    if automatic:
        g.add_argument(
            "--no-compaction",
            action="store_true",
            help="never compact from this process (run rrb-compact instead)",
        )


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit == "d" else 1) and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def compaction(
    args: argparse.Namespace, stream_url: str, prefix: str, **extra: Any
) -> CompactConfig:
    """The settings of :func:`add_compaction`'s options. Raises ``ConfigError``."""
    values: dict[str, Any] = {}
    for field, flag in (
        ("retention", "--retention"),
        ("level1_every", "--level1-every"),
        ("level2_every", "--level2-every"),
        ("snapshot_every", "--snapshot-every"),
        ("grace", "--compaction-grace"),
    ):
        text = getattr(args, field if field != "grace" else "compaction_grace")
        if text is not None:
            values[field] = parse_duration(text, flag)
    return CompactConfig(
        stream_url=stream_url,
        path_prefix=prefix,
        own_prefix=args.own_prefix,
        enabled=not getattr(args, "no_compaction", False),
        tls=tls(args),
        **values,
        **extra,
    ).validate()
