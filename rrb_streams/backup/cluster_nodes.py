"""The bridge's view of a Redis Cluster source: its masters, now.

Keyspace notifications are node-local, so the bridge subscribes on every master
(:meth:`rrb_streams.backup.bridge.Bridge`), and follows the topology: Redis announces no
failover and no resharding, so the topology is read every ``topology_interval`` seconds and
whenever a subscription fails. This module holds what that needs:

- :meth:`ClusterNodes.prepare`: the cluster is whole (every slot assigned) and every node,
  replicas included (any may become a master), publishes the events the bridge needs;
- one client per node, for subscriptions, ``SCAN`` (node-local, like events) and ``INFO``;
- :meth:`ClusterNodes.exists`: ``EXISTS`` of keys on the masters owning their slots, for the
  rescan's walk over the stored-keys index. A key whose slot moved meanwhile counts as
  absent: an uploader reads it where it now lives, and finds out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from rrb_streams.backup.notify import ensure_notifications
from rrb_streams.errors import NotificationsRefused
from rrb_streams.wire import resp
from rrb_streams.wire.cluster import Address, Node, NodeClients, Topology, TopologyFinder, slot_of
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url


class ClusterNodes:
    """The nodes of the source cluster found from ``url``, and a client for each."""

    def __init__(self, url: str, *, tls: TlsOptions = NO_TLS, log: Any = None) -> None:
        self.url = url
        self._tls = tls
        self._log = log
        self.finder = TopologyFinder(url, tls=tls, name="rrb-bridge")
        self.topology = Topology(())
        self._nodes = NodeClients(url, tls=tls, name="rrb-bridge")
        self._configured: set[Address] = set()  # nodes whose notifications we checked

    def client(self, address: Address) -> Redis:
        """The client of the node at ``address`` (created on first use)."""
        return self._nodes.get(address)

    def url_of(self, address: Address) -> str:
        return self._nodes.url_of(address)

    async def refresh(self) -> Topology:
        """Read the topology again (``redis`` errors when no node answers)."""
        self.topology = await self.finder.read()
        return self.topology

    async def prepare(self, *, notifications: bool) -> None:
        """Check the cluster is whole, and (``notifications``) that every node publishes the
        events we need. Raises ``ConfigError`` naming unassigned slots, and
        ``NotificationsRefused`` naming the node that refused ``CONFIG``."""
        topology = await self.refresh()
        topology.check_complete(redact_url(self.url))
        if notifications:
            for node in topology.nodes:
                await self.configure(node, strict=True)

    async def configure(self, node: Node, *, strict: bool = False) -> None:
        """Make ``node`` publish the events we need, once per node. ``strict``: a refusal
        raises; else it is logged, and tried again on the next call."""
        if node.address in self._configured:
            return
        try:
            value = await ensure_notifications(self.client(node.address))
        except NotificationsRefused as exc:
            if strict:
                raise NotificationsRefused(f"cluster node {node}: {exc}") from exc
            if self._log is not None:
                self._log.error("bridge.node_refused_config", node=str(node), error=str(exc))
            return
        except (RedisError, OSError) as exc:
            if strict:
                raise
            if self._log is not None:
                self._log.warning("bridge.node_unreachable", node=str(node), error=str(exc))
            return
        self._configured.add(node.address)
        if value is not None and self._log is not None:
            self._log.info(
                "bridge.notifications_enabled", node=str(node), notify_keyspace_events=value
            )

    def forget(self, address: Address) -> None:
        """A node restarted (new ``run_id``): its flags are those of its config file again."""
        self._configured.discard(address)

    def masters(self) -> list[Node]:
        return self.topology.masters

    async def exists(
        self, keys: Sequence[bytes], *, only: set[Address] | None = None
    ) -> list[bool]:
        """Whether each key exists, asked of the master owning its slot. A key whose slot
        has no master, or moved since the topology was read, counts as absent. With
        ``only``, keys of other masters count as present: not looked up at all."""
        by_owner: dict[Address, list[int]] = {}
        out = [False] * len(keys)
        for i, key in enumerate(keys):
            owner = self.topology.owner(slot_of(key))
            if owner is not None and only is not None and owner.address not in only:
                out[i] = True
            elif owner is not None:
                by_owner.setdefault(owner.address, []).append(i)
        for address, indices in by_owner.items():
            replies = await resp.pipeline(
                self.client(address), [(b"EXISTS", keys[i]) for i in indices]
            )
            for i, reply in zip(indices, replies, strict=True):
                if isinstance(reply, ResponseError):
                    continue  # MOVED or ASK: absent as far as we know; the uploader reads it
                out[i] = bool(reply)
        return out

    async def close(self) -> None:
        await self._nodes.close()
