"""The metrics endpoint of a long-running command, run beside the work.

``--metrics-port PORT`` (or ``RRB_METRICS_PORT``) turns it on; ``--metrics-host HOST`` (or
``RRB_METRICS_HOST``, default ``0.0.0.0``) picks the address (:func:`endpoint`).
:func:`observing` binds the port before the command's components start, so a port in use
stops the command at once (``DependencyError``: exit 1), then serves ``/metrics``,
``/healthz`` and ``/readyz`` (:mod:`rrb_streams.ops.http`) and keeps the change stream's
gauges fresh (:class:`StreamGauges`) until its block ends.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rrb_streams.errors import ConfigError
from rrb_streams.logs import get_logger
from rrb_streams.ops.http import Check, MetricsServer, Readiness
from rrb_streams.ops.metrics import Metrics
from rrb_streams.ops.status import StreamStatus, collect
from rrb_streams.storage.base import Storage
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.slot_client import connect_own
from rrb_streams.wire.tls import TlsOptions

DEFAULT_HOST = "0.0.0.0"  # scraped from other hosts, as exporters are
PORT_ENV = "RRB_METRICS_PORT"
HOST_ENV = "RRB_METRICS_HOST"
POLL_INTERVAL = 5.0  # seconds between reads of the change stream's gauges
POLL_TIMEOUT = 2.0


@dataclass(frozen=True)
class Endpoint:
    """Where to serve the metrics; ``poll_interval``: seconds between stream gauge reads."""

    host: str
    port: int
    poll_interval: float = POLL_INTERVAL


def endpoint(
    port: str | None, host: str | None, env: Mapping[str, str] | None = None
) -> Endpoint | None:
    """The endpoint that ``--metrics-port`` and ``--metrics-host`` (over the environment)
    ask for; ``None`` when off.

    Raises ``ConfigError`` naming the flag (or variable) and the value when the port is not
    a number from 1 to 65535 or the host is empty.
    """
    env = os.environ if env is None else env
    raw, source = port, "--metrics-port"
    if raw is None:
        raw, source = env.get(PORT_ENV) or None, PORT_ENV
    host_source = "--metrics-host"
    if host is None:
        host, host_source = env.get(HOST_ENV, DEFAULT_HOST), HOST_ENV
    if raw is None:
        return None
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise ConfigError(f"invalid {source} {raw!r}: must be a port number from 1 to 65535")
    if not host.strip():
        raise ConfigError(f"invalid {host_source} {host!r}: must not be empty")
    return Endpoint(host.strip(), number)


def metrics_for(where: Endpoint | None) -> Metrics | None:
    """Fresh metrics for a command whose endpoint is on; ``None`` (record nothing) when off."""
    return None if where is None else Metrics()


class StreamGauges:
    """The change stream's state as gauges: ``metrics.part(StreamGauges)``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.length = metrics.gauge("rrb_stream_length", "Entries in the change stream (XLEN).")
        self.dead_letters = metrics.gauge(
            "rrb_stream_dead_letters", "Entries in the dead-letter stream."
        )
        self.pending = metrics.gauge(
            "rrb_stream_group_pending",
            "Entries delivered to a consumer of the group and not yet acknowledged.",
            ["group"],
        )
        self.lag = metrics.gauge(
            "rrb_stream_group_lag",
            "Entries of the stream not yet delivered to the group.",
            ["group"],
        )
        self.oldest_pending = metrics.gauge(
            "rrb_stream_oldest_pending_age_seconds",
            "Age of the group's oldest pending entry (0 when none is pending).",
            ["group"],
        )
        self.polled = metrics.gauge(
            "rrb_stream_polled_timestamp_seconds",
            "Unix time of the last successful read of the stream gauges.",
        )

    def set(self, status: StreamStatus) -> None:
        """Set every gauge from one :func:`rrb_streams.ops.status.collect`."""
        self.length.set(status.length)
        self.dead_letters.set(status.dead_letters)
        # Cleared and set without an await in between: a scrape never sees a half state.
        for gauge in (self.pending, self.lag, self.oldest_pending):
            gauge.clear()
        for g in status.groups:
            self.pending.labels(g.name).set(g.pending)
            if g.lag is not None:
                self.lag.labels(g.name).set(g.lag)
            self.oldest_pending.labels(g.name).set((g.oldest_pending_age_ms or 0) / 1000)
        self.polled.set(time.time())

    async def poll(self, r: Redis, own: OwnKeys, interval: float) -> None:
        """Forever: read the change stream's state into the gauges every ``interval``.

        A failed read counts ``rrb_errors_total{component="metrics"}`` and leaves the gauges
        as they were; ``rrb_stream_polled_timestamp_seconds`` shows how old they are.
        """
        while True:
            try:
                with anyio.fail_after(POLL_TIMEOUT):
                    status = await collect(r, own)
            except (RedisError, OSError, TimeoutError) as exc:
                self._metrics.error("metrics", type(exc).__name__)
            else:
                self.set(status)
            await anyio.sleep(interval)


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
                gauges = metrics.part(StreamGauges)
                # Its own client: in a cluster it follows the own keys' slot (connect_own).
                polled = clients[f"own:{url}"] = connect_own(url, own, name="rrb-metrics", tls=tls)
                tg.start_soon(gauges.poll, polled, own, where.poll_interval)
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
