"""``rrb-status``: the change stream as an operator (or a monitor) reads it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rrb_streams.cli import options
from rrb_streams.cli.common import entry, execute, parser, redis_url, usage_error
from rrb_streams.config import StatusConfig
from rrb_streams.errors import ConfigError
from rrb_streams.logs import configure
from rrb_streams.ops.status import collect, render
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.urls import redact_url


def status(argv: Sequence[str] | None = None) -> int:
    """``rrb-status``: stream length, pending, lag, consumers, dead letters."""
    p = parser(
        "rrb-status",
        "Show the change stream: length, per-group pending and lag, consumers, dead letters.",
        "Redis holding the change stream (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    options.add_own_prefix(p, "rrb's keys")
    p.add_argument("--json", action="store_true", help="print JSON")
    options.add_tls(p)
    args = p.parse_args(argv)
    configure(debug=args.debug, quiet=True)
    try:
        cfg = StatusConfig(
            stream_url=redis_url(args),
            own_prefix=args.own_prefix,
            as_json=args.json,
            tls=options.tls(args),
        ).validate()
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> int:
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

    return execute(p.prog, args.debug, body)


status_main = entry(status)
