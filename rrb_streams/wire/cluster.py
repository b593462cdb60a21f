"""Redis Cluster: telling a cluster node from a single Redis, and the cluster's shape.

A cluster node's URL means the whole cluster, with no flag: :func:`is_cluster` asks the node
(``INFO cluster``). The shape comes from ``CLUSTER SHARDS`` (Redis 7.0+; ``CLUSTER SLOTS``, which
7.0 deprecates, on older nodes) asked of any node that answers: which master owns each of the
16384 slots, and its replicas. Redis sends nothing when it changes (a failover, a resharding),
so whoever routes by it asks again on a redirection, and every few seconds meanwhile.

Nodes are reached with the URL they were found through, its host and port replaced: the same
scheme (``rediss://`` stays TLS), ACL user and password.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from rrb_streams.errors import ConfigError
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.resp import pipeline
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url

SLOTS = 16384

#: ``ASKING`` packed: sent before a command that follows an ``ASK`` redirection.
ASKING = b"*1\r\n$6\r\nASKING\r\n"

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Node:
    """One node as the cluster describes it."""

    id: str
    host: str
    port: int
    master: bool
    healthy: bool = True  # "online" in CLUSTER SHARDS; CLUSTER SLOTS lists only live ones

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Shard:
    """A master, the slot ranges it owns (inclusive), and its replicas."""

    master: Node
    slots: tuple[tuple[int, int], ...]
    replicas: tuple[Node, ...] = ()


class Topology:
    """The cluster's shards, and a table of the master owning each slot."""

    def __init__(self, shards: Iterable[Shard]) -> None:
        self.shards = tuple(s for s in shards if s.slots)
        self._owner: list[Node | None] = [None] * SLOTS
        for shard in self.shards:
            for lo, hi in shard.slots:
                self._owner[lo : hi + 1] = [shard.master] * (hi - lo + 1)

    @property
    def masters(self) -> list[Node]:
        """The masters that own slots."""
        return [s.master for s in self.shards]

    @property
    def nodes(self) -> list[Node]:
        """Every node that owns slots or replicates one that does."""
        return [n for s in self.shards for n in (s.master, *s.replicas)]

    def owner(self, slot: int) -> Node | None:
        """The master owning ``slot``; ``None`` while no master does."""
        return self._owner[slot]

    def slots_of(self, master: Address) -> list[tuple[int, int]]:
        """The slot ranges of the master at ``master``."""
        return [r for s in self.shards if s.master.address == master for r in s.slots]

    def unassigned(self) -> list[tuple[int, int]]:
        """Slot ranges no master owns, in order."""
        out: list[tuple[int, int]] = []
        for slot, node in enumerate(self._owner):
            if node is None:
                if out and out[-1][1] == slot - 1:
                    out[-1] = (out[-1][0], slot)
                else:
                    out.append((slot, slot))
        return out

    def check_complete(self, where: str) -> None:
        """Raise ``ConfigError`` naming the unassigned slots, if any: a cluster that serves
        only some of its keys cannot be backed up whole, nor restored into."""
        missing = self.unassigned()
        if missing:
            count = sum(hi - lo + 1 for lo, hi in missing)
            shown = ", ".join(_span(lo, hi) for lo, hi in missing[:5])
            more = ", ..." if len(missing) > 5 else ""
            raise ConfigError(
                f"the Redis Cluster at {where} has {count} of {SLOTS} slots unassigned "
                f"({shown}{more}): assign every slot to a master first "
                "(redis-cli --cluster fix)"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._owner == other._owner

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Topology({', '.join(str(m) for m in self.masters)})"


def slot_of(key: bytes) -> int:
    """The key's hash slot (its ``{hash tag}`` only, when it has one)."""
    return int(key_slot(key))


def node_url(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced, and database 0 (a cluster has no other)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"[{host}]" if ":" in host else host
    netloc = f"{netloc}:{port}"
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((parts.scheme, netloc, "/0", parts.query, ""))


async def is_cluster(r: Redis) -> bool:
    """Whether ``r`` is a node of a Redis Cluster (``cluster_enabled:1``). A user that may
    not run ``INFO`` is taken to be on a single Redis: the ACL rules for a cluster allow it
    (docs/security.md), those of a single Redis need not."""
    try:
        info = await r.info("cluster")
    except NoPermissionError:
        return False
    return str(info.get("cluster_enabled", 0)) == "1"


async def read_topology(r: Redis, where: str) -> Topology:
    """The cluster's shape as the node ``r`` sees it. ``where`` names the node in errors."""
    (reply,) = await pipeline(r, [(b"CLUSTER", b"SHARDS")])
    if isinstance(reply, ResponseError):
        if "unknown" not in str(reply).lower():
            raise reply
        (reply,) = await pipeline(r, [(b"CLUSTER", b"SLOTS")])
        if isinstance(reply, ResponseError):
            raise reply
        return Topology(_from_slots(reply, where))
    return Topology(_from_shards(reply, where))


def _from_shards(reply: Sequence[object], where: str) -> list[Shard]:
    shards = []
    for raw in reply:
        fields = _pairs(raw)
        flat = [int(v) for v in _list(fields.get("slots", []))]  # type: ignore[call-overload]
        ranges = tuple(zip(flat[0::2], flat[1::2], strict=True))
        master: Node | None = None
        replicas = []
        for raw_node in _list(fields.get("nodes", [])):
            node = _node(_pairs(raw_node), where)
            if node.master:
                master = node
            else:
                replicas.append(node)
        if master is not None:
            shards.append(Shard(master, ranges, tuple(replicas)))
    return shards


def _from_slots(reply: Sequence[object], where: str) -> list[Shard]:
    by_master: dict[Address, tuple[Node, list[tuple[int, int]], list[Node]]] = {}
    for raw in reply:
        row = _list(raw)
        lo, hi = int(row[0]), int(row[1])  # type: ignore[call-overload]
        nodes = [_slots_node(_list(n), i == 0, where) for i, n in enumerate(row[2:])]
        master, *replicas = nodes
        entry = by_master.setdefault(master.address, (master, [], replicas))
        entry[1].append((lo, hi))
    return [Shard(m, tuple(r), tuple(reps)) for m, r, reps in by_master.values()]


def _slots_node(row: list[object], master: bool, where: str) -> Node:
    host = _text(row[0])
    if not host:
        host = urlsplit(where).hostname or "127.0.0.1"
    node_id = _text(row[2]) if len(row) > 2 else f"{host}:{row[1]}"
    return Node(node_id, host, int(row[1]), master)  # type: ignore[call-overload]


def _node(fields: dict[str, object], where: str) -> Node:
    host = _text(fields.get("endpoint", b""))
    if host in ("", "?"):
        host = _text(fields.get("ip", b""))
    if not host:  # a node that does not know its own address: the one we asked
        host = urlsplit(where).hostname or "127.0.0.1"
    # A TLS cluster may list only a tls-port; one with both serves TLS on tls-port.
    tls = urlsplit(where).scheme == "rediss"
    port = (fields.get("tls-port") if tls else None) or fields.get("port") or fields.get("tls-port")
    return Node(
        id=_text(fields.get("id", b"")),
        host=host,
        port=int(port),  # type: ignore[call-overload]
        master=_text(fields.get("role", b"")) == "master",
        healthy=_text(fields.get("health", b"online")) == "online",
    )


def _pairs(raw: object) -> dict[str, object]:
    """A RESP2 flat list of name, value pairs (or a RESP3 map) as a dict."""
    if isinstance(raw, dict):
        return {_text(k): v for k, v in raw.items()}
    items = _list(raw)
    return {_text(k): v for k, v in zip(items[0::2], items[1::2], strict=True)}


def _list(raw: object) -> list[object]:
    if isinstance(raw, list | tuple):
        return list(raw)
    raise ValueError(f"unexpected CLUSTER reply: {raw!r}")


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


async def probe(url: str, *, tls: TlsOptions = NO_TLS, what: str = "Redis") -> bool:
    """Whether the Redis at ``url`` is a cluster node. Raises ``DependencyError`` (naming
    ``what``) when it cannot be reached."""
    r = connect(url, db=0, name="rrb", tls=tls)  # a cluster refuses SELECT of another db
    try:
        await ping(r, url, what)
        return await is_cluster(r)
    finally:
        await r.aclose()


class TopologyFinder:
    """Reads the topology from the first node that answers: the nodes it last saw (masters
    first), then the URL it was given. A failover or a dead node never leaves it asking only
    the node it started from."""

    def __init__(self, url: str, *, tls: TlsOptions = NO_TLS, name: str = "rrb") -> None:
        self.url = url
        self._tls = tls
        self._name = name
        self._known: list[Node] = []

    def url_of(self, address: Address) -> str:
        return node_url(self.url, *address)

    async def read(self) -> Topology:
        """The topology; raises ``redis.exceptions.ConnectionError`` when no node answers."""
        last: BaseException | None = None
        candidates = [n.address for n in sorted(self._known, key=lambda n: not n.master)]
        urls = [*(self.url_of(a) for a in dict.fromkeys(candidates)), self.url]
        for url in urls:
            r = connect(url, name=self._name, tls=self._tls)
            try:
                topology = await read_topology(r, redact_url(url))
            except (RedisError, OSError) as exc:
                last = exc
                continue
            finally:
                await r.aclose()
            self._known = topology.nodes
            return topology
        raise RedisConnectionError(f"no node of the cluster at {redact_url(self.url)}: {last}")


class NodeClients:
    """One client per cluster node, made on first use, each reached with the URL's scheme and
    credentials (:func:`node_url`)."""

    def __init__(self, url: str, *, tls: TlsOptions = NO_TLS, name: str = "rrb") -> None:
        self.url = url
        self._tls = tls
        self._name = name
        self._clients: dict[Address, Redis] = {}

    def url_of(self, address: Address) -> str:
        return node_url(self.url, *address)

    def get(self, address: Address) -> Redis:
        r = self._clients.get(address)
        if r is None:
            r = self._clients[address] = connect(
                self.url_of(address), name=self._name, tls=self._tls
            )
        return r

    async def close(self) -> None:
        """Close every client. Idempotent."""
        clients, self._clients = list(self._clients.values()), {}
        for r in clients:
            await r.aclose()
