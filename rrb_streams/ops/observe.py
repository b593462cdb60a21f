"""The metrics endpoint of a long-running command: its options, and running it beside the work.

``--metrics-port PORT`` (or ``RRB_METRICS_PORT``) turns it on; ``--metrics-host HOST`` (or
``RRB_METRICS_HOST``, default ``0.0.0.0``) picks the address. :func:`observing` binds the
port before the command's components start, so a port in use stops the command at once
(``DependencyError``: exit 1), then serves ``/metrics``, ``/healthz`` and ``/readyz``
(:mod:`rrb_streams.ops.http`) and keeps the change stream's gauges fresh until its block ends.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis

from rrb_streams.errors import ConfigError
from rrb_streams.logs import get_logger
from rrb_streams.ops.http import Check, MetricsServer, Readiness
from rrb_streams.ops.metrics import POLL_INTERVAL, Metrics, poll_stream
from rrb_streams.storage.base import Storage
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.tls import TlsOptions

DEFAULT_HOST = "0.0.0.0"  # scraped from other hosts, as exporters are
PORT_ENV = "RRB_METRICS_PORT"
HOST_ENV = "RRB_METRICS_HOST"


@dataclass(frozen=True)
class Endpoint:
    """Where to serve the metrics; ``poll_interval``: seconds between stream gauge reads."""

    host: str
    port: int
    poll_interval: float = POLL_INTERVAL


def add_options(p: argparse.ArgumentParser) -> None:
    """Add ``--metrics-port`` and ``--metrics-host`` to a command's parser."""
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port",
        metavar="PORT",
        help=f"serve /metrics, /healthz and /readyz on PORT (default: ${PORT_ENV}, else off)",
    )
    g.add_argument(
        "--metrics-host",
        metavar="HOST",
        help=f"address to serve them on (default: ${HOST_ENV}, else {DEFAULT_HOST})",
    )


def endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The endpoint the options (over the environment) ask for; ``None`` when off.

    Raises ``ConfigError`` naming the flag (or variable) and the value when the port is not
    a number from 1 to 65535 or the host is empty.
    """
    raw, source = args.metrics_port, "--metrics-port"
    if raw is None:
        raw, source = os.environ.get(PORT_ENV) or None, PORT_ENV
    host, host_source = args.metrics_host, "--metrics-host"
    if host is None:
        host, host_source = os.environ.get(HOST_ENV, DEFAULT_HOST), HOST_ENV
    if raw is None:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid {source} {raw!r}: must be a port number from 1 to 65535")
    if not host.strip():
        raise ConfigError(f"invalid {host_source} {host!r}: must not be empty")
    return Endpoint(host.strip(), port)


def metrics_for(where: Endpoint | None) -> Metrics | None:
    """Fresh metrics for a command whose endpoint is on; ``None`` (record nothing) when off."""
    return None if where is None else Metrics()


@asynccontextmanager
async def observing(
    where: Endpoint | None,
    metrics: Metrics | None,
    *,
    redis: Sequence[tuple[str, str]],
    tls: TlsOptions,
    storage: Storage | None = None,
    stream: tuple[str, OwnKeys] | None = None,
) -> AsyncIterator[MetricsServer | None]:
    """Serve ``metrics`` on ``where`` while the block runs; nothing when either is ``None``.

    ``/readyz`` pings each ``(name, url)`` of ``redis`` (each URL once) and checks ``storage``.
    ``stream``: the change stream's Redis URL and rrb's key names, whose gauges to poll.
    Raises ``DependencyError`` before the block when the address cannot be bound.
    """
    if where is None or metrics is None:
        yield None
        return
    clients: dict[str, Redis] = {}

    def client(url: str) -> Redis:
        if url not in clients:
            clients[url] = connect(url, name="rrb-metrics", tls=tls)
        return clients[url]

    checks: list[Check] = []
    for name, url in redis:
        if url not in clients:
            checks.append((name, functools.partial(ping, client(url), url, name)))
    if storage is not None:
        checks.append(("storage", storage.check))
    failure: Exception | None = None
    try:
        server = await MetricsServer.bind(where.host, where.port, metrics, Readiness(checks))
        get_logger("metrics").info("metrics.listening", host=where.host, port=server.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            if stream is not None:
                url, own = stream
                tg.start_soon(poll_stream, metrics, client(url), own, where.poll_interval)
            try:
                yield server
            except Exception as exc:
                failure = exc  # raised below as itself, not inside the task group's group
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for c in clients.values():
                await c.aclose()
    if failure is not None:
        raise failure
