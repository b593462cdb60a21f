"""``rrb-verify``: the proof that storage matches the source, key by key."""

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
from rrb_streams.config import VerifyConfig, default
from rrb_streams.errors import ConfigError
from rrb_streams.logs import configure, get_logger
from rrb_streams.ops.progress import Progress
from rrb_streams.verify.report import exit_status, render
from rrb_streams.verify.verifier import Verifier


def verify(argv: Sequence[str] | None = None) -> int:
    """``rrb-verify``: compare the live keys with the latest objects in storage."""
    p = parser(
        "rrb-verify",
        "Compare every live key with its latest object in storage: missing, stale and extra "
        "objects. Exit status 0 only when all three are 0, 3 when differences were found.",
        "source Redis (default: $REDIS_SERVER, else redis://localhost:6379/0)",
    )
    options.add_storage(p)
    p.add_argument(
        "--match",
        default=default(VerifyConfig, "match"),
        metavar="GLOB",
        help="check only keys matching GLOB",
    )
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
        default=default(VerifyConfig, "recheck_delay"),
        metavar="SECONDS",
        help="wait before checking a difference again; keys that change meanwhile are not "
        "counted (default: %(default)g)",
    )
    options.add_stream(p)
    options.add_age(p, writes=False, reads=True)
    options.add_tls(p)
    args = p.parse_args(argv)
    tty = sys.stderr.isatty() and not args.quiet
    configure(debug=args.debug, quiet=args.quiet, default_level="WARNING" if tty else "INFO")
    try:
        spec = options.storage(args)
        cfg = VerifyConfig(
            source_url=redis_url(args),
            stream_url=args.stream_url,
            path_prefix=args.path,
            match=args.match,
            all_dbs=args.all_dbs,
            own_prefix=args.own_prefix,
            repair=args.repair,
            recheck_delay=args.recheck_delay,
            tls=options.tls(args),
        ).validate()
    except ConfigError as exc:
        return usage_error(p.prog, exc)

    async def body() -> int:
        log = get_logger("verify")
        async with opened_storage(spec, reading="verify") as storage:
            verifier = Verifier(
                await found_clusters(cfg),
                storage,
                progress=lambda unit: Progress(
                    tty=tty, log=log, event="verify.progress", unit=unit
                ),
            )
            summary = await verifier.run()
        if args.json:
            print(json.dumps(summary.to_dict(repair=cfg.repair), indent=2))
        else:
            print(render(summary, repair=cfg.repair))
        return exit_status(summary)

    return execute(p.prog, args.debug, body)


verify_main = entry(verify)
