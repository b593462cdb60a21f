"""``rrb-status``: the change stream as an operator (or a monitor) reads it, and with
``--storage`` the backup's own state as storage holds it.

With ``--storage`` each part is read on its own: a stream Redis that is unreachable or holds
no stream does not hide the backup's state, nor the other way round. Whatever could be read is
printed; every part that could not is one line on stderr, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

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
from rrb_streams.config import StatusConfig, default, parse_duration
from rrb_streams.errors import ConfigError, RrbError
from rrb_streams.logs import configure
from rrb_streams.ops.backup_state import OVERDUE_FACTOR, BackupState, collect_backup, render_backup
from rrb_streams.ops.status import StreamStatus, collect, render
from rrb_streams.wire.connections import ping
from rrb_streams.wire.slot_client import connect_own
from rrb_streams.wire.urls import redact_url


def status(argv: Sequence[str] | None = None) -> int:
    """``rrb-status``: stream length, pending, lag, consumers, dead letters; with
    ``--storage``, the recovery point, levels, retention and compaction of the backup."""
    p = parser(
        "rrb-status",
        "Show the change stream: length, per-group pending and lag, consumers, dead letters. "
        "With --storage, also the backup kept there: its recovery point (newest read stored), "
        "oldest restorable moment, objects per compaction level, and the last compaction.",
        "Redis holding the change stream (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    options.add_own_prefix(p, "rrb's keys")
    p.add_argument("--json", action="store_true", help="print JSON")
    g = p.add_argument_group("the backup in storage (segments layout)")
    g.add_argument(
        "--storage",
        metavar="URL",
        help="also show the backup in this storage: s3://bucket/prefix, file:///path or a path",
    )
    g.add_argument("-P", "--path", default="", metavar="PREFIX", help="prefix of the object names")
    every = default(StatusConfig, "level1_every")
    g.add_argument(
        "--level1-every",
        metavar="DURATION",
        help=f"the backup's --level1-every: compaction is reported overdue when a level-0 "
        f"segment and the newest manifest are older than {OVERDUE_FACTOR} times it "
        f"(default: {options.duration_text(every)})",
    )
    grace = default(StatusConfig, "compaction_grace")
    g.add_argument(
        "--compaction-grace",
        metavar="DURATION",
        help="the backup's --compaction-grace: read with no identity, an encrypted backup's "
        "manifest is not known, so a level-0 segment counts as overdue only after this "
        f"much longer (default: {options.duration_text(grace)})",
    )
    g.add_argument(
        "--age-identity",
        metavar="FILE",
        help="age identity file, to read an encrypted backup's manifest and block indexes "
        "(default: $RRB_AGE_IDENTITY_FILE; without one, what the listing and the "
        "objects' headers tell)",
    )
    options.add_tls(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=True)
    try:
        if args.storage is None and args.level1_every is not None:
            raise ConfigError("--level1-every needs --storage")
        if args.storage is None and args.compaction_grace is not None:
            raise ConfigError("--compaction-grace needs --storage")
        if args.storage is None and args.age_identity is not None:
            raise ConfigError("--age-identity needs --storage")
        cfg = StatusConfig(
            stream_url=redis_url(args),
            own_prefix=args.own_prefix,
            as_json=args.json,
            storage=options.storage(args) if args.storage else None,
            path_prefix=args.path,
            level1_every=(
                every
                if args.level1_every is None
                else parse_duration(args.level1_every, "--level1-every")
            ),
            compaction_grace=(
                grace
                if args.compaction_grace is None
                else parse_duration(args.compaction_grace, "--compaction-grace")
            ),
            tls=options.tls(args),
        ).validate()
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def read_stream() -> StreamStatus:
        found = await found_clusters(cfg)
        r = connect_own(found.stream_url, found.own, name="rrb-status", tls=cfg.tls)
        try:
            await ping(r, cfg.stream_url, "stream Redis")
            return await collect(r, found.own)
        finally:
            await r.aclose()

    def no_stream(result: StreamStatus) -> str:
        # A monitor pointed at the wrong Redis, db or prefix must not read this as healthy.
        return (
            f"no change stream {result.stream!r} at {redact_url(cfg.stream_url)} (no bridge "
            "has run against it, or the URL, db or --own-prefix is wrong)"
        )

    async def stream_only() -> int:
        result = await read_stream()
        if cfg.as_json:
            print(result.to_json())
        elif result.exists:
            print(render(result))
        if result.exists:
            return 0
        sys.stderr.write(f"{p.prog}: error: {no_stream(result)}\n")
        return 1

    async def read_backup() -> BackupState:
        assert cfg.storage is not None
        async with opened_storage(cfg.storage, reading="show") as storage:
            return await collect_backup(
                storage,
                cfg.path_prefix,
                level1_every=cfg.level1_every,
                compaction_grace=cfg.compaction_grace,
            )

    async def with_backup() -> int:
        errors: list[str] = []

        def failed(exc: BaseException, text: str) -> None:
            if args.debug:
                traceback.print_exception(exc)
            errors.append(text)

        stream: StreamStatus | None = None
        try:
            stream = await read_stream()
            if not stream.exists:
                errors.append(no_stream(stream))
        except RrbError as exc:
            failed(exc, str(exc))
        except RedisError as exc:
            failed(exc, f"stream Redis at {redact_url(cfg.stream_url)}: {exc}")
        backup: BackupState | None = None
        try:
            backup = await read_backup()
            if not backup.found:
                errors.append(
                    f"{backup.location} holds no segment-layout backup (no segments/ or "
                    "manifest/ objects): check --storage and -P; the keys layout has no "
                    "compaction state to show"
                )
                backup = None
        except RrbError as exc:
            failed(exc, str(exc))
        if cfg.as_json:
            out: dict[str, Any] = {
                "change_stream": json.loads(stream.to_json()) if stream is not None else None,
                "backup": backup.to_dict() if backup is not None else None,
                "errors": errors,
            }
            print(json.dumps(out, indent=2))
        else:
            parts = [render(stream)] if stream is not None and stream.exists else []
            parts += [render_backup(backup)] if backup is not None else []
            if parts:
                print("\n\n".join(parts))
        for error in errors:
            sys.stderr.write(f"{p.prog}: error: {error}\n")
        return 1 if errors else 0

    return execute(p.prog, args.debug, with_backup if cfg.storage is not None else stream_only)


status_main = entry(status)
