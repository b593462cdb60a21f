"""Gap rescans: send the watched keys to the change stream whenever events may be missing.

A rescan of a db has two passes, both as ``scan`` changes:

1. walk the db's stored-keys index (:mod:`rrb_streams.wire.index`) for the keys that storage holds
   but the source no longer does: deleted, expired, flushed or swapped away unseen;
2. SCAN the source for the keys that exist: any of them may have changed unseen.

The walk goes first because the uploaders fill the index with the keys the SCAN sends: walked
after it, the index of a first backup would hold every key just sent, and each would cost an
``EXISTS`` for nothing. Either order finds every gone key: one deleted after the walk is
deleted while the subscription listens, or a newer gap restarts the rescan.

``Gaps`` collects the reasons (startup, reconnect, a restart) and numbers them; a rescan that
sees a newer number starts over from cursor 0, because keys it already passed may have changed
while no events arrived. Both passes pause between steps so the source keeps serving clients,
and they feed the same bounded channel as live events, so they can never outrun the writer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.backup.cluster_nodes import ClusterNodes
from rrb_streams.backup.metrics import BridgeMetrics
from rrb_streams.config import BridgeConfig
from rrb_streams.ops.metrics import Metrics
from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.wire.cluster import Address
from rrb_streams.wire.entries import SCAN_EVENT, NewEntry, now_ms
from rrb_streams.wire.index import absent_page, exist_on, indexed_dbs
from rrb_streams.wire.urls import url_db

DEFAULT_DATABASES = 16  # Redis's default, assumed where CONFIG GET databases is refused


class Gaps:
    """Why a rescan is owed, and a generation number that restarts a running one.

    A gap of one cluster node (``node``: its address) owes a rescan of that node's keys only;
    any other gap, of everything. A rescan covers the union of what its gaps owe.
    """

    def __init__(self, log: Any) -> None:
        self._log = log
        self._event = anyio.Event()
        self._reasons: list[str] = []
        self._nodes: set[Address] | None = set()  # None: everything
        self.generation = 0

    def report(self, reason: str, node: Address | None = None, **details: Any) -> None:
        """Record a gap (logged as ``bridge.gap_detected``) and wake or restart the rescan."""
        if node is not None:
            details["node"] = f"{node[0]}:{node[1]}"
        self._log.info("bridge.gap_detected", reason=reason, **details)
        self.generation += 1
        if reason not in self._reasons:
            self._reasons.append(reason)
        if node is None:
            self._nodes = None
        elif self._nodes is not None:
            self._nodes.add(node)
        self._event.set()

    async def wait(self) -> list[str]:
        """Wait for a gap; return the reasons reported since the last call."""
        reasons, _ = await self.wait_scoped()
        return reasons

    async def wait_scoped(self) -> tuple[list[str], set[Address] | None]:
        """Wait for a gap; the reasons reported since the last call, and the nodes they owe a
        rescan of (``None``: everything)."""
        await self._event.wait()
        self._event = anyio.Event()
        reasons, self._reasons = self._reasons, []
        nodes, self._nodes = self._nodes, set()
        return reasons, nodes


class Rescanner:
    """Runs one rescan per burst of gaps, logging ``bridge.rescan_done`` with counts (and
    counting it in ``metrics`` under each of its reasons)."""

    def __init__(
        self,
        cfg: BridgeConfig,
        gaps: Gaps,
        client: Callable[[int], Redis],
        stream: Redis,
        log: Any,
        *,
        metrics: Metrics | None = None,
        cluster: ClusterNodes | None = None,
    ) -> None:
        """``cluster``: the source is a Redis Cluster: its one db is scanned on every master
        (SCAN is node-local, like events), and index keys are looked up where they live."""
        self._cfg = cfg
        self._cluster = cluster
        self._nodes: set[Address] | None = None  # the cluster nodes this rescan covers
        self._metrics = metrics
        self._db = url_db(cfg.source_url)
        self._own = cfg.own
        self._gaps = gaps
        self._client = client  # the source client for one db
        self._stream = stream  # where the change stream and the stored-keys index live
        self._retrying = Retrying(log, "bridge", "rescan", cap=cfg.max_backoff, metrics=metrics)
        self._log = log
        self._databases_count: int | None = None

    async def run(self, send: MemoryObjectSendStream[NewEntry]) -> None:
        """Forever: wait for a gap, then send to ``send``, as ``scan`` changes, every watched key
        of the source URL's db (of every db holding keys or indexed keys with ``all_dbs``) that
        exists or that the stored-keys index lists."""
        reasons: list[str] = []
        nodes: set[Address] | None = set()
        started: float | None = None
        while True:
            more, owed = await self._gaps.wait_scoped()
            reasons += [r for r in more if r not in reasons]
            nodes = None if nodes is None or owed is None else nodes | owed
            self._nodes = nodes
            generation = self._gaps.generation
            started = started or time.monotonic()
            dbs = (
                [self._db]
                if not self._cfg.all_dbs or self._cluster is not None
                else await self._databases(generation)
            )
            counts = None if dbs is None else await self._scan(send, generation, dbs)
            if counts is None:
                self._log.info("bridge.rescan_restarted", reasons=list(reasons))
                continue
            keys, gone, skipped = counts
            self._log.info(
                "bridge.rescan_done",
                reasons=reasons,
                nodes=None if nodes is None else sorted(f"{h}:{p}" for h, p in nodes),
                keys=keys,
                gone=gone,
                skipped_own=skipped,
                dbs=dbs,
                seconds=round(time.monotonic() - started, 3),
            )
            if self._metrics is not None:
                self._metrics.part(BridgeMetrics).rescanned(reasons)
            reasons, nodes, started = [], set(), None

    async def _scan(
        self, send: MemoryObjectSendStream[NewEntry], generation: int, dbs: list[int]
    ) -> tuple[int, int, int] | None:
        """``(keys enqueued, gone keys enqueued, own keys skipped)``, or ``None`` when a newer
        gap interrupts."""
        keys = gone = skipped = 0
        for db in dbs:
            absent = await self._walk_index(send, generation, db)
            if absent is None:
                return None
            live = await self._scan_keys(send, generation, db)
            if live is None:
                return None
            keys, skipped, gone = keys + live[0], skipped + live[1], gone + absent
        return keys, gone, skipped

    async def _scan_keys(
        self, send: MemoryObjectSendStream[NewEntry], generation: int, db: int
    ) -> tuple[int, int] | None:
        """SCAN ``db`` (every master of a cluster): ``(keys enqueued, own keys skipped)``, or
        ``None`` when interrupted."""
        if self._cluster is None:
            return await self._scan_node(send, generation, db, self._client(db))
        keys = skipped = 0
        # A master that failed over meanwhile is a gap of its own, which restarts this scan.
        for master in self._cluster.masters():
            if self._nodes is not None and master.address not in self._nodes:
                continue
            found = await self._scan_node(
                send, generation, db, self._cluster.client(master.address)
            )
            if found is None:
                return None
            keys, skipped = keys + found[0], skipped + found[1]
        return keys, skipped

    async def _scan_node(
        self, send: MemoryObjectSendStream[NewEntry], generation: int, db: int, client: Redis
    ) -> tuple[int, int] | None:
        cfg = self._cfg
        keys = skipped = 0
        cursor = 0
        while True:
            if self._gaps.generation != generation:
                return None
            try:
                cursor, found = await client.scan(
                    cursor=cursor, match=cfg.pattern, count=cfg.scan_count
                )
            except TRANSIENT as exc:
                # Cursors are stateless on the server, so retrying the step is enough; a
                # restarted source reports a gap of its own and the scan starts over.
                await self._retrying.failed(self, exc)
                continue
            self._retrying.succeeded(self)
            now = now_ms()
            for key in cast(list[bytes], found):
                if self._own.is_own(key):
                    skipped += 1
                    continue
                await _send(send, (db, key, SCAN_EVENT, now))
                keys += 1
            if cursor == 0:
                return keys, skipped
            await anyio.sleep(cfg.scan_pause)

    async def _walk_index(
        self, send: MemoryObjectSendStream[NewEntry], generation: int, db: int
    ) -> int | None:
        """Enqueue the watched keys of ``db``'s index that the source lacks; how many, or
        ``None`` when interrupted."""
        cfg = self._cfg
        gone = 0
        cursor = 0
        while True:
            if self._gaps.generation != generation:
                return None
            try:
                cursor, absent = await absent_page(
                    self._stream,
                    self._exists(db),
                    self._own,
                    db,
                    cursor,
                    pattern=cfg.pattern,
                    count=cfg.scan_count,
                )
            except TRANSIENT as exc:
                await self._retrying.failed(self, exc)
                continue
            self._retrying.succeeded(self)
            now = now_ms()
            for key in absent:
                await _send(send, (db, key, SCAN_EVENT, now))
                gone += 1
            if cursor == 0:
                return gone
            await anyio.sleep(cfg.scan_pause)

    def _exists(self, db: int) -> Callable[[Sequence[bytes]], Awaitable[list[bool]]]:
        """How to ask whether keys of ``db`` exist: on the source, or where a cluster keeps
        them."""
        if self._cluster is not None:
            return functools.partial(self._cluster.exists, only=self._nodes)
        return functools.partial(exist_on, self._client(db))

    async def _databases(self, generation: int) -> list[int] | None:
        """Every db INFO keyspace lists (those holding keys) and every db with an index, or
        ``None`` if interrupted. A flushed db holds no keys, but its index still names them."""
        while self._gaps.generation == generation:
            source = self._client(self._db)
            try:
                info: dict[str, Any] = await source.info("keyspace")
                count = await self._database_count(source)
                indexed = await indexed_dbs(self._stream, self._own, range(count))
            except TRANSIENT as exc:
                await self._retrying.failed(self, exc)
                continue
            self._retrying.succeeded(self)
            return sorted({int(name[2:]) for name in info if name.startswith("db")} | {*indexed})
        return None

    async def _database_count(self, source: Redis) -> int:
        """The source's ``databases`` setting (fixed while it runs), read once."""
        if self._databases_count is None:
            try:
                reply = await source.config_get("databases")
                self._databases_count = int(str(reply["databases"]))
            except (ResponseError, KeyError, ValueError):
                self._databases_count = DEFAULT_DATABASES
        return self._databases_count


async def _send(send: MemoryObjectSendStream[NewEntry], change: NewEntry) -> None:
    """Send without yielding while the channel has room: the writer then finds a whole page
    of keys waiting and XADDs them in one pipeline, not a few at a time."""
    try:
        send.send_nowait(change)
    except anyio.WouldBlock:
        await send.send(change)
