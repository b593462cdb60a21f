"""A client for one hash slot of a Redis Cluster: connections to whichever master owns it now.

rrb keeps its own keys in a cluster (the change stream, leases, done markers, the index) in
one slot, by a hash tag, so every script and transaction over them stays in one slot. The code
that uses them takes a plain ``redis.asyncio.Redis``; :func:`connect_slot` gives it one whose
pool connects to the slot's current master:

- the owner is read from the topology (:mod:`rrb_streams.wire.cluster`) before the first
  connection, again every :data:`RECHECK` seconds while the client is used, and as soon as a
  reply says the slot is elsewhere or the cluster is failing over (``MOVED``, ``CLUSTERDOWN``,
  ``READONLY``, a connection error);
- a connection to a node that no longer owns the slot is closed and opened to the new owner
  when the pool hands it out, so a caller's retry after a failover reaches the new master.

Callers see the failover as errors they retry anyway (every loop of ours retries
``RedisError``). A failover may lose writes the old master acknowledged but had not
replicated: to the bridge, that is the stream Redis restarting (its ``run_id`` changes), a
gap it heals by rescanning.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import (
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rrb_streams.wire.cluster import Address, TopologyFinder, slot_of
from rrb_streams.wire.connections import connect
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url

RECHECK = 5.0  # seconds between topology reads while nothing went wrong
_SUSPECT_MIN = 0.2  # seconds between topology reads after errors
_SUSPICIOUS = (MovedError, ClusterDownError, ReadOnlyError, RedisConnectionError, RedisTimeoutError)


class SlotOwner:
    """Where one slot lives now, learned from any node that answers."""

    def __init__(self, url: str, slot: int, *, tls: TlsOptions = NO_TLS) -> None:
        self.url = url
        self.slot = slot
        self.address: Address | None = None
        self._finder = TopologyFinder(url, tls=tls, name="rrb-topology")
        self._checked = 0.0
        self._suspect = False

    def suspect(self) -> None:
        """A reply suggested the slot moved: read the topology before the next connection."""
        self._suspect = True

    async def current(self) -> Address:
        """The owner's address, read again when due."""
        now = time.monotonic()
        due = now - self._checked >= (_SUSPECT_MIN if self._suspect else RECHECK)
        if self.address is None or due:
            await self.refresh()
        assert self.address is not None
        return self.address

    async def refresh(self) -> None:
        """Ask the cluster which master owns the slot. While no node answers, or none owns
        the slot, the last owner known stays: connecting to it fails, and asks again."""
        self._checked = time.monotonic()
        try:
            topology = await self._finder.read()
        except RedisError:
            if self.address is None:
                raise
            return
        owner = topology.owner(self.slot)
        if owner is None:
            if self.address is None:
                raise ClusterDownError(f"slot {self.slot} of {redact_url(self.url)} has no master")
            return
        self.address = owner.address
        self._suspect = False


class _Follows:
    """Mixed into a connection class: flags the owner as suspect on a telling reply."""

    owner: SlotOwner

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _SUSPICIOUS:
            self.owner.suspect()
            raise


class SlotPool(ConnectionPool):
    """A pool whose connections go to the slot's current master."""

    def __init__(self, owner: SlotOwner, **kwargs: Any) -> None:
        base = kwargs.pop("connection_class", Connection)
        follows = type(f"Slot{base.__name__}", (_Follows, base), {"owner": owner})
        super().__init__(connection_class=follows, **kwargs)
        self.owner = owner

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        host, port = await self.owner.current()
        self.connection_kwargs.update(host=host, port=port)  # for connections made from now
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def ensure_connection(self, connection: Any) -> None:
        """Point a pooled connection at the owner before it is used: one made for the old
        owner is closed and opened again to the new one."""
        target = (self.connection_kwargs["host"], self.connection_kwargs["port"])
        if (connection.host, connection.port) != target:
            await connection.disconnect()
            connection.host, connection.port = target
        try:
            await super().ensure_connection(connection)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self.owner.suspect()  # the owner died, or failed over: look again soon
            raise


def connect_slot(url: str, slot: int, *, name: str = "rrb", tls: TlsOptions = NO_TLS) -> Redis:
    """A client of the master owning ``slot`` of the cluster that ``url``'s node is part of.
    Lazy, like :func:`rrb_streams.wire.connections.connect`."""
    template = connect(url, name=name, tls=tls)  # the options every client of ours gets
    kwargs = dict(template.connection_pool.connection_kwargs)
    kwargs["connection_class"] = template.connection_pool.connection_class
    kwargs["db"] = 0
    pool = SlotPool(SlotOwner(url, slot, tls=tls), **kwargs)
    return Redis.from_pool(pool)


def connect_own(url: str, own: OwnKeys, *, name: str = "rrb", tls: TlsOptions = NO_TLS) -> Redis:
    """The client for rrb's own keys at ``url``: of their slot's master when they live in a
    cluster (``own.cluster``), else a plain client."""
    if own.cluster:
        return connect_slot(url, slot_of(own.slot_tag), name=name, tls=tls)
    return connect(url, name=name, tls=tls)
