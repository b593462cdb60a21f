"""What every command does the same way: its parser, its error handling, and its run.

Bad input prints one line naming the bad value and exits 2. An unreachable or refusing
dependency prints one line and exits 1. Neither prints a traceback unless ``--debug``.

A long-running command runs the same sequence: open and check its storage, build its
components, serve ``/metrics`` beside them (:func:`rrb_streams.ops.observe.observing`), run
them until they return or a signal stops them (:func:`rrb_streams.service.serve`), and close
the storage whatever happened. :func:`opened_storage` and :func:`serve_observed` are that
sequence, written once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import anyio

from rrb_streams import __version__
from rrb_streams.errors import ConfigError, DependencyError, RrbError
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.ops.observe import Endpoint, metrics_for, observing
from rrb_streams.service import Component, serve
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec, open_storage
from rrb_streams.wire.cluster import probe
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.tls import TlsOptions
from rrb_streams.wire.urls import redact_url, url_db

DEFAULT_REDIS = "redis://localhost:6379/0"

#: A command's body: returns its exit status (``None``: 0).
Body = Callable[[], Awaitable[int | None]]


class Parser(argparse.ArgumentParser):
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


def parser(prog: str, description: str, url_help: str) -> Parser:
    """A command's parser with the options every command has: the Redis URL, ``--debug``,
    ``-q`` and ``--version``."""
    p = Parser(prog=prog, description=description)
    p.add_argument("url", nargs="?", metavar="REDIS_URL", help=url_help)
    p.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def redis_url(args: argparse.Namespace) -> str:
    """The positional Redis URL, else ``REDIS_SERVER``, else the local default."""
    return str(args.url or os.environ.get("REDIS_SERVER") or DEFAULT_REDIS)


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


Config = TypeVar("Config")


async def found_clusters(cfg: Config) -> Config:
    """``cfg`` with ``source_cluster`` and ``stream_cluster`` set to what its servers are: a
    Redis Cluster node's URL means the whole cluster, with no flag. Raises
    ``DependencyError`` when a server cannot be reached, ``ConfigError`` for a cluster URL
    naming a db other than 0."""
    found: dict[str, Any] = {}
    tls: TlsOptions = getattr(cfg, "tls")  # noqa: B009 - every config has one
    source_url: str | None = getattr(cfg, "source_url", None)
    if source_url is not None:
        found["source_cluster"] = await probe(source_url, tls=tls, what="source Redis")
        if found["source_cluster"] and url_db(source_url) != 0:
            raise ConfigError(
                f"{redact_url(source_url)} is a Redis Cluster node, and a cluster has only "
                "db 0: drop the db from the URL"
            )
    stream_url: str | None = getattr(cfg, "stream_url", None)
    if stream_url:
        found["stream_cluster"] = await probe(stream_url, tls=tls, what="stream Redis")
    elif source_url is not None:
        found["stream_cluster"] = found["source_cluster"]
    return replace(cfg, **found)  # type: ignore[type-var]


def execute(prog: str, debug: bool, body: Body) -> int:
    """Run ``body`` under anyio; map errors to one line and an exit status."""
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


def usage_error(prog: str, exc: ConfigError) -> int:
    """Report bad input found after parsing (a config's ``validate()``): exit status 2."""
    sys.stderr.write(f"{prog}: error: {exc}\n")
    return 2


def say(lines: Sequence[str], quiet: bool) -> None:
    """The friendly start-up summary, on a terminal only (logs carry the same facts)."""
    if quiet or not sys.stderr.isatty():
        return
    for line in lines:
        sys.stderr.write(line + "\n")


def storage_lines(spec: StorageSpec, prefix: str) -> list[str]:
    """The start-up summary's lines about storage."""
    lines = [f"[*] Storage: {spec.description}"]
    if spec.defaulted:
        lines.append("    (no --storage and no S3_BUCKET: using the folder ./rrb-backup)")
    if prefix:
        lines.append(f"[*] Using base path: '{prefix}'")
    return lines


@asynccontextmanager
async def opened_storage(
    spec: StorageSpec, *, reading: str | None = None
) -> AsyncIterator[Storage]:
    """The storage ``spec`` names, checked, and closed when the block ends, whatever happened.

    ``reading`` names what a command that only reads does with it (``"restore"``): a folder
    that does not exist is then a mistyped path, refused with ``DependencyError``, where a
    writer would create it.
    """
    if reading is not None and spec.path is not None and not await anyio.Path(spec.path).exists():
        raise DependencyError(f"storage folder {spec.path} does not exist: nothing to {reading}")
    if spec.defaulted:
        get_logger("storage").warning(
            "storage.default", path=str(spec.path), hint="set --storage or S3_BUCKET"
        )
    storage = open_storage(spec)
    try:
        await storage.check()
        yield storage
    finally:
        with anyio.CancelScope(shield=True):
            await storage.close()


async def serve_observed(
    where: Endpoint | None,
    build: Callable[[Metrics | None], Sequence[Component]],
    *,
    grace: float,
    redis: Sequence[tuple[str, str]],
    tls: TlsOptions,
    storage: Storage | None = None,
    stream: tuple[str, OwnKeys] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Build the components (with metrics when ``where`` asks for them) and run them until
    they return or a signal stops them, serving the metrics endpoint meanwhile.

    ``redis`` (name, URL) and ``storage`` are what ``/readyz`` checks; ``stream`` is the change
    stream's Redis URL and key names, whose gauges to keep fresh.
    """
    metrics = metrics_for(where)
    components = build(metrics)
    async with observing(where, metrics, redis=redis, tls=tls, storage=storage, stream=stream):
        await serve(components, grace=grace, on_started=on_started)


#: The cyclic garbage collector runs after this many new container objects (Python's default
#: is 700). A restore or a merge makes and drops hundreds of thousands of records a second,
#: none of them in a reference cycle (reference counting frees them); at the default, the
#: collector ran every few hundred records and took about 40% of a restore's time. What it
#: still collects (cycles through tracebacks, mostly) waits a little longer, that is all.
GC_THRESHOLD = 100_000


def entry(command: Callable[[Sequence[str] | None], int]) -> Callable[[], NoReturn]:
    """A console script's ``main``: ``command`` on ``sys.argv``, its result the exit status."""

    def main() -> NoReturn:
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        sys.exit(command(sys.argv[1:]))

    return main
