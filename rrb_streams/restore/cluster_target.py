"""Writing into a Redis Cluster: each command on the master that owns its key's slot.

The restore packs its commands once (RESP bytes, one key each; see
:mod:`rrb_streams.wire.resp`). :meth:`ClusterTarget.send` groups them by the master owning each
key's slot in the topology it last read, sends every master its share in one pipeline, all
masters at once, and gives the replies back in the order of the commands. redis-py's
``RedisCluster`` is not in the way: it would encode and route each command on its own.

Redirections are the cluster's normal life, never a key's fault, so none of them is ever a
reply the caller sees:

- ``MOVED`` (a failover or a resharding moved the slot): the slot's new owner is taken from the
  reply, the topology is read again, and the command resent there;
- ``ASK`` (the slot is migrating and the key is not on its owner): the command is resent to
  the importing node named, after ``ASKING`` on the same connection;
- ``TRYAGAIN``, ``CLUSTERDOWN``, ``READONLY`` (a master demoted by a failover), ``LOADING``,
  ``MASTERDOWN``, a master that does not answer, a slot no master owns: a short backoff, the
  topology again, another try.

Only the commands redirected go again, to wherever they now belong: at once the first time,
then after a backoff of 50 ms doubling up to 1 s. A node that fails as a whole (its connection
lost mid-pipeline) gets its whole share again: the writes are idempotent, as with a single
Redis. After :data:`ATTEMPTS` rounds the last error is raised as
:class:`~rrb_streams.wire.cluster_source.ClusterUnavailable`, a transient ``RedisError`` that
is not a ``ResponseError``: the caller's own retry takes over, and no key is blamed.

The topology is shared by the writers of a process: one that finds it stale reads it again,
unless another did meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from rrb_streams.errors import DependencyError
from rrb_streams.wire import resp
from rrb_streams.wire.cluster import (
    ASKING,
    SLOTS,
    Address,
    NodeClients,
    Topology,
    TopologyFinder,
    slot_of,
)
from rrb_streams.wire.cluster_source import ATTEMPTS, BACKOFF, BACKOFF_MAX, ClusterUnavailable
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url

#: One command in the Redis protocol: packed bytes, or the pieces of one too large to copy.
Packed = bytes | Sequence[bytes | memoryview]


#: Replies that say "not now": wait, read the topology again, try again.
_WAIT = (TryAgainError, ClusterDownError, ReadOnlyError, MasterDownError)


class ClusterTarget:
    """The target when it is a Redis Cluster, found from the URL of any of its nodes.

    Call :meth:`start` first, :meth:`close` at the end. Safe to share between tasks.
    """

    def __init__(self, url: str, *, tls: TlsOptions = NO_TLS, name: str = "rrb-restore") -> None:
        self.url = url
        self._tls = tls
        self._name = name
        self._finder = TopologyFinder(url, tls=tls, name=name)
        self._owners: list[Address | None] = [None] * SLOTS
        self._nodes = NodeClients(url, tls=tls, name=name)
        self._generation = 0  # topologies read so far
        self._lock = anyio.Lock()
        self.refreshes = 0  # topology reads after the first, for tests and logs

    async def start(self) -> Topology:
        """Read the topology. Raises ``ConfigError`` naming the slots no master owns (nothing
        could be restored into them), ``DependencyError`` when no node answers."""
        try:
            topology = await self._finder.read()
        except RedisError as exc:
            raise DependencyError(
                f"cannot read the shape of the Redis Cluster at {redact_url(self.url)}: {exc}"
            ) from exc
        topology.check_complete(redact_url(self.url))
        self._use(topology)
        return topology

    def client_at(self, address: Address) -> Redis:
        """The client of the node at ``address``, created on first use."""
        return self._nodes.get(address)

    async def close(self) -> None:
        """Close every node's client. Idempotent."""
        await self._nodes.close()

    async def send(self, commands: Sequence[Packed], keys: Sequence[bytes]) -> list[Any]:
        """Run each command (of the one key at the same place in ``keys``) on the master of
        its key's slot; the replies in order, a ``ResponseError`` value for each command the
        cluster refused for its own reasons (never a redirection).

        Raises ``ClusterUnavailable`` when some command found no master to take it within
        :data:`ATTEMPTS` rounds.
        """
        replies: list[Any] = [None] * len(commands)
        slots = [slot_of(k) for k in keys]
        pending = list(range(len(commands)))
        asked: dict[int, Address] = {}  # command -> the importing node an ASK named
        delay = BACKOFF
        last: BaseException | None = None
        for attempt in range(ATTEMPTS):
            generation = self._generation
            owners = self._owners
            plan: dict[Address, list[int]] = {}
            retry: list[int] = []
            for i in pending:
                where = asked.get(i) if asked else None
                if where is None:
                    where = owners[slots[i]]
                    if where is None:
                        last = ClusterDownError(f"slot {slots[i]} has no master")
                        retry.append(i)
                        continue
                plan.setdefault(where, []).append(i)
            wait = stale = bool(retry)
            for address, got in (await self._run(plan, commands, asked)).items():
                sent = plan[address]
                if isinstance(got, BaseException):  # the node failed as a whole
                    last = got
                    wait = stale = True
                    retry += sent
                    for i in sent:
                        asked.pop(i, None)
                    continue
                for i, reply in zip(sent, got, strict=True):
                    if not isinstance(reply, ResponseError):
                        replies[i] = reply
                    elif isinstance(reply, MovedError):  # before AskError: it is one
                        last = reply
                        asked.pop(i, None)
                        self._moved(reply)
                        stale = True
                        retry.append(i)
                    elif isinstance(reply, AskError):
                        last = reply
                        asked[i] = (reply.host or _host(self.url), int(reply.port))
                        retry.append(i)
                    elif isinstance(reply, _WAIT):
                        last = reply
                        asked.pop(i, None)
                        wait = stale = True
                        retry.append(i)
                    else:
                        replies[i] = reply
            if not retry:
                return replies
            pending = retry
            # A redirection is followed at once, the first time: nodes that disagree about
            # a slot for longer get the time to settle.
            if wait or attempt:
                await anyio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2)
            if stale:
                try:
                    await self._refresh(generation)
                except RedisError as exc:
                    last = exc
        raise ClusterUnavailable(
            f"the Redis Cluster at {redact_url(self.url)} did not take {len(pending)} writes "
            f"in {ATTEMPTS} tries: {type(last).__name__}: {last}"
        ) from last

    # -- the topology -----------------------------------------------------------------------

    def _use(self, topology: Topology) -> None:
        owners: list[Address | None] = [None] * SLOTS
        for shard in topology.shards:
            address = shard.master.address
            for lo, hi in shard.slots:
                owners[lo : hi + 1] = [address] * (hi - lo + 1)
        self._owners = owners
        self._generation += 1

    def _moved(self, reply: MovedError) -> None:
        """Believe the reply about its slot at once; the topology read next says the rest."""
        self._owners[int(reply.slot_id)] = (reply.host or _host(self.url), int(reply.port))

    async def _refresh(self, generation: int) -> None:
        """Read the topology again, unless another task did since ``generation``."""
        async with self._lock:
            if self._generation != generation:
                return
            self.refreshes += 1
            self._use(await self._finder.read())

    # -- sending ----------------------------------------------------------------------------

    async def _run(
        self, plan: dict[Address, list[int]], commands: Sequence[Packed], asked: dict[int, Address]
    ) -> dict[Address, list[Any] | BaseException]:
        """Each node's replies, or the error that failed the node as a whole."""
        out: dict[Address, list[Any] | BaseException] = {}

        async def node(address: Address, sent: list[int]) -> None:
            try:
                out[address] = await self._send(address, sent, commands, asked)
            except (RedisError, OSError) as exc:
                out[address] = exc

        if len(plan) == 1:
            await node(*next(iter(plan.items())))
        else:
            async with anyio.create_task_group() as tg:
                for address, sent in plan.items():
                    tg.start_soon(node, address, sent)
        return out

    async def _send(
        self,
        address: Address,
        sent: list[int],
        commands: Sequence[Packed],
        asked: dict[int, Address],
    ) -> list[Any]:
        """One node's commands in one pipeline (a large value after it, in pieces); their
        replies in the order of ``sent``."""
        r = self.client_at(address)
        if not asked and all(type(commands[i]) is bytes for i in sent):
            packed = b"".join([commands[i] for i in sent])  # type: ignore[misc]
            return await resp.pipeline_packed(r, packed, len(sent))
        parts: list[bytes] = []
        shape: list[int] = []  # per command: replies before its own (ASKING's), or -1: large
        for i in sent:
            command = commands[i]
            ask = i in asked
            if not ask and type(command) is not bytes:
                shape.append(-1)
                continue
            if ask:
                parts.append(ASKING)
            # A large value redirected by ASK is copied whole: rare, and it must follow
            # ASKING on the same connection.
            parts.append(command if type(command) is bytes else b"".join(command))  # type: ignore[arg-type]
            shape.append(1 if ask else 0)
        replies = await resp.pipeline_packed(r, b"".join(parts), len(parts)) if parts else []
        out: list[Any] = []
        pos = 0
        for i, skip in zip(sent, shape, strict=True):
            if skip < 0:
                out.append(await resp.send_large(r, commands[i]))  # type: ignore[arg-type]
                continue
            pos += skip
            out.append(replies[pos])
            pos += 1
        return out

    def __repr__(self) -> str:
        return f"ClusterTarget({redact_url(self.url)!r})"


def _host(url: str) -> str:
    """The host of ``url``: where a redirection that names no host points."""
    return urlsplit(url).hostname or "127.0.0.1"
