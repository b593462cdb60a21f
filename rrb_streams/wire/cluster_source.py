"""Reading keys' current state from a Redis Cluster: each key where the cluster keeps it.

The keys of a read are grouped by hash slot, and each slot's keys are read in one
``MULTI``/``EXEC`` on the master that owns the slot: ``DUMP``, expiry and ``TYPE`` per key, then
the keyless ``TIME`` (see :mod:`rrb_streams.wire.source`). A master's transactions go out
pipelined on one connection, and the masters are read at once. Read times then come from
several clocks; the ordering stamp taken with each key's lease, not the read time, decides
which read of a key is newest.

Redirections are a cluster's normal life, never a key's fault, and never dead-letter one:

- ``MOVED`` (a failover or a resharding moved the slot): the topology is read again and the
  slot retried where it now lives;
- ``ASK`` (the slot is migrating and some of its keys moved already): the slot is read again
  one key per transaction. A key its owner no longer holds is read on the importing node
  after ``ASKING``, which answers for it: a key in neither place is absent;
- ``TRYAGAIN``, ``CLUSTERDOWN``, a master that does not answer or is a replica now: a short
  backoff, the topology again, and another try.

After :data:`ATTEMPTS` rounds the last error is raised as :class:`ClusterUnavailable`, a
transient error: the caller's own retry loop takes over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ExecAbortError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire.cluster import ASKING, Address, NodeClients, Topology, TopologyFinder, slot_of
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.resp import pipeline_packed
from rrb_streams.wire.source import (
    KeyReadError,
    KeySource,
    Source,
    major_version,
    read_body,
    read_count,
    records_from,
)
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url

#: Rounds of a read before its redirections or outages are left to the caller's retry.
ATTEMPTS = 8
BACKOFF = 0.05  # seconds, doubled per round up to BACKOFF_MAX
BACKOFF_MAX = 1.0

_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"

#: Replies that mean "not here, not now": retried after the topology is read again.
_ROUTING = (
    MovedError,
    TryAgainError,
    ClusterDownError,
    ReadOnlyError,  # a master demoted by a failover
    BusyLoadingError,
)


def open_source(url: str, *, cluster: bool, tls: TlsOptions = NO_TLS) -> KeySource:
    """The source at ``url``: the whole cluster when ``cluster`` (found at start)."""
    return ClusterSource(url, tls=tls) if cluster else Source(url, tls=tls)


class ClusterUnavailable(RedisError):
    """The cluster could not serve a read within :data:`ATTEMPTS` rounds (a failover under
    way, say). Transient: not a ``ResponseError``, so no key is blamed for it."""


@dataclass(slots=True)
class _Job:
    """One transaction: keys of one slot, read on one node."""

    slot: int
    indices: list[int]
    keys: list[bytes]
    asking: bool = False


class ClusterSource:
    """The source when it is a Redis Cluster, found from the URL of any of its nodes.

    Same contract as :class:`rrb_streams.wire.source.Source`: :meth:`check`, then :meth:`read`.
    """

    def __init__(
        self, url: str, *, exact_expiry: bool | None = None, tls: TlsOptions = NO_TLS
    ) -> None:
        self.url = url
        self._tls = tls
        self._exact_expiry = exact_expiry
        self._nodes = NodeClients(url, tls=tls, name="rrb-upload")
        self._versions: dict[Address, str] = {}
        self._topology: Topology | None = None
        self._finder = TopologyFinder(url, tls=tls, name="rrb-upload")
        self.redis_version = ""

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise RuntimeError("ClusterSource.check() was not called")
        return self._topology

    def client_at(self, address: Address) -> Redis:
        """The client of the node at ``address`` (created on first use)."""
        return self._nodes.get(address)

    def scan_clients(self, db: int) -> list[Redis]:
        """A client of every master, as of the last topology read (``SCAN`` is node-local)."""
        return [self.client_at(m.address) for m in self.topology.masters]

    async def check(self) -> None:
        """Reach the cluster, learn its shape and its masters' versions. Raises
        ``DependencyError`` when the node is unreachable, ``ConfigError`` when slots are
        unassigned."""
        seed = connect(self.url, name="rrb-upload", tls=self._tls)
        try:
            await ping(seed, self.url, "source Redis Cluster")
        finally:
            await seed.aclose()
        topology = await self._finder.read()
        topology.check_complete(redact_url(self.url))
        self._topology = topology
        for master in topology.masters:
            await self._version_of(master.address)
        majors = [major_version(v) for v in self._versions.values()]
        self.redis_version = min(self._versions.values(), key=major_version, default="")
        if self._exact_expiry is None:
            self._exact_expiry = min(majors, default=0) >= 7

    async def refresh(self) -> Topology:
        """Read the topology again, from the first node that answers."""
        try:
            self._topology = await self._finder.read()
        except RedisError as exc:
            raise ClusterUnavailable(str(exc)) from exc
        return self._topology

    async def read(
        self,
        db: int,
        keys: Sequence[bytes],
        entry_ids: Sequence[str],
        stamps: Sequence[int] | None = None,
    ) -> list[KeyRecord | KeyReadError]:
        """Read every key where the cluster keeps it; one result per key, in order."""
        results: list[KeyRecord | KeyReadError | None] = [None] * len(keys)
        if db != 0:
            return [KeyReadError(k, "a Redis Cluster has only db 0") for k in keys]
        pending: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            pending.setdefault(slot_of(key), []).append(i)
        one_by_one: set[int] = set()  # slots read a key per transaction (ASK seen)
        asked: dict[int, Address] = {}  # key index -> the importing node ASK named
        delay = BACKOFF
        last: BaseException | None = None
        for _ in range(ATTEMPTS):
            plan, unowned = self._plan(keys, pending, one_by_one, asked)
            outcomes = await self._run(plan)
            retry: dict[int, list[int]] = {slot: pending[slot] for slot in unowned}
            stale = bool(unowned)
            for address, jobs in plan.items():
                for job, outcome in zip(jobs, outcomes[address], strict=True):
                    if isinstance(outcome, list):
                        version = self._versions.get(address, self.redis_version)
                        got = records_from(
                            outcome,
                            0,
                            job.keys,
                            [entry_ids[i] for i in job.indices],
                            None if stamps is None else [stamps[i] for i in job.indices],
                            version,
                            bool(self._exact_expiry),
                        )
                        for i, rec in zip(job.indices, got, strict=True):
                            results[i] = rec
                        continue
                    last = outcome
                    if isinstance(outcome, AskError):
                        if len(job.indices) == 1 and job.slot in one_by_one:
                            asked[job.indices[0]] = (outcome.host, int(outcome.port))
                        one_by_one.add(job.slot)
                    elif isinstance(outcome, ResponseError) and not isinstance(outcome, _ROUTING):
                        if len(job.indices) > 1:  # find the key at fault: one at a time
                            one_by_one.add(job.slot)
                        else:
                            results[job.indices[0]] = KeyReadError(
                                keys[job.indices[0]], f"source refused to read the key: {outcome}"
                            )
                            continue
                    else:
                        stale = True
                        for i in job.indices:  # the slot moved: its keys are not asked for
                            asked.pop(i, None)
                    retry.setdefault(job.slot, []).extend(job.indices)
            if not retry:
                break
            pending = {slot: sorted(set(idx)) for slot, idx in retry.items()}
            await anyio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)
            if stale:
                try:
                    await self.refresh()
                except ClusterUnavailable as exc:
                    last = exc
        else:
            raise ClusterUnavailable(
                f"the cluster did not serve {sum(len(v) for v in pending.values())} keys "
                f"after {ATTEMPTS} tries: {type(last).__name__}: {last}"
            ) from last
        return [r for r in results if r is not None]

    def _plan(
        self,
        keys: Sequence[bytes],
        pending: dict[int, list[int]],
        one_by_one: set[int],
        asked: dict[int, Address],
    ) -> tuple[dict[Address, list[_Job]], list[int]]:
        """The transactions to send per node, and the slots no master owns right now."""
        topology = self.topology
        plan: dict[Address, list[_Job]] = {}
        unowned = []
        for slot, indices in pending.items():
            owner = topology.owner(slot)
            if owner is None:
                unowned.append(slot)
                continue
            if slot not in one_by_one:
                job = _Job(slot, indices, [keys[i] for i in indices])
                plan.setdefault(owner.address, []).append(job)
                continue
            for i in indices:
                target = asked.get(i)
                where = owner.address if target is None else target
                job = _Job(slot, [i], [keys[i]], asking=target is not None)
                plan.setdefault(where, []).append(job)
        return plan, unowned

    async def _run(self, plan: dict[Address, list[_Job]]) -> dict[Address, list[Any]]:
        """Send each node its transactions at once; per node, per job: EXEC's replies, or
        the error that stopped the transaction (the node's error, for every job of a node
        that failed as a whole)."""
        out: dict[Address, list[Any]] = {}

        async def node(address: Address, jobs: list[_Job]) -> None:
            try:
                out[address] = await self._send(address, jobs)
            except (RedisError, OSError) as exc:
                out[address] = [exc] * len(jobs)

        async with anyio.create_task_group() as tg:
            for address, jobs in plan.items():
                tg.start_soon(node, address, jobs)
        return out

    async def _send(self, address: Address, jobs: list[_Job]) -> list[Any]:
        await self._version_of(address)
        keys_of: list[int] = []
        parts: list[bytes] = []
        total = 0
        for job in jobs:
            count = read_count(len(job.indices))
            keys_of.append(count)
            body = read_body(job.keys, exact_expiry=bool(self._exact_expiry))
            parts += [ASKING if job.asking else b"", _MULTI, body, _EXEC]
            total += (1 if job.asking else 0) + 1 + count + 1
        replies = await pipeline_packed(self.client_at(address), b"".join(parts), total)
        out: list[Any] = []
        pos = 0
        for job, count in zip(jobs, keys_of, strict=True):
            pos += 1 if job.asking else 0  # ASKING's OK (an error shows in QUEUED replies)
            queued = replies[pos : pos + 1 + count]
            reply = replies[pos + 1 + count]
            pos += 2 + count
            if isinstance(reply, ExecAbortError):
                refused = next((q for q in queued if isinstance(q, ResponseError)), reply)
                out.append(refused)
            elif isinstance(reply, Exception):
                out.append(reply)
            else:
                out.append(list(reply))
        return out

    async def _version_of(self, address: Address) -> None:
        if address not in self._versions:
            info = await self.client_at(address).info("server")
            self._versions[address] = str(info.get("redis_version", ""))

    async def close(self) -> None:
        """Close every client. Idempotent."""
        await self._nodes.close()

    def __repr__(self) -> str:
        return f"ClusterSource({redact_url(self.url)!r})"
