"""rrb-bridge: keyspace notifications in, durable change-stream entries out.

Pub/sub is fire and forget: whatever the source publishes while the bridge is not subscribed is
gone. Every moment when events may have been missed is a *gap*, healed by a SCAN of the watched
keys into the stream (``ev="scan"``), and of the keys the stored-keys index lists that no longer
exist (see :mod:`rrb_streams.backup.rescan`). Gaps are:

- ``startup``: the first subscription; ``takeover`` when this bridge stood by first, or led
  before and lost the lease. Of several bridges for one source only the holder of the leader
  lease subscribes and writes (see :mod:`rrb_streams.backup.leader`), and each of its terms begins
  with this gap;
- ``lease_lapsed``: the leader's lease ran out with no other bridge taking it (a long pause,
  a stream Redis restarted empty), and the leader took it back;
- ``reconnect``: every later subscription, whether the bridge re-subscribed after an error or
  redis-py reconnected and re-subscribed on its own inside ``get_message``;
- ``source_restart`` / ``stream_restart``: a ``run_id`` changed, seen by a periodic INFO;
- ``source_wipe`` / ``stream_wipe``: FLUSHDB, FLUSHALL or SWAPDB ran. They emit no keyspace
  events, so the same periodic INFO reads their ``commandstats`` call counters, and any
  increase (or a reset of the counters, which hides one) is a gap. The rescan then enqueues
  what the wipe changed: the keys a SWAPDB brought in, and through the stored-keys index the
  keys that are gone. The backup is back in line within ``watch_interval`` plus one rescan
  and the uploaders' drain. A wipe of the stream's own Redis loses the entries it held, which
  the rescan also makes good.

Both subscription gaps are raised by the server's PSUBSCRIBE confirmation, read from the
subscription itself, so a rescan only starts once the server delivers events to us again: each
change is then either forwarded live or found by the scan. A gap during a rescan restarts it;
a restarted source also drops the subscription, so its rescan is restarted once more by the
reconnect, after the subscription is back.

A key deleted while nobody listened leaves nothing for a SCAN to find; the index still lists
it, so the walk over the index finds it.

Events and rescanned keys share one bounded channel into one writer that XADDs pipelined
batches. While the stream Redis is down the writer retries its batch, the channel fills and the
bridge stops reading the subscription; if the source then drops us as a slow subscriber, the
reconnect is a gap like any other.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.backup.cluster_nodes import ClusterNodes
from rrb_streams.backup.leader import Leadership
from rrb_streams.backup.metrics import BridgeMetrics
from rrb_streams.backup.notify import (
    channel_pattern,
    channel_patterns,
    ensure_notifications,
    parse_channel,
)
from rrb_streams.backup.rescan import Gaps, Rescanner
from rrb_streams.config import BridgeConfig
from rrb_streams.errors import DependencyError
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.wire.cluster import Address
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.entries import NewEntry, entry_pairs, now_ms
from rrb_streams.wire.group import ensure_group
from rrb_streams.wire.keys import DEFAULT_GROUP
from rrb_streams.wire.slot_client import connect_own
from rrb_streams.wire.urls import redact_url, url_db

_READ_TIMEOUT = 1.0  # seconds; waking up lets redis-py health-check an idle subscription


async def _run_id(r: Redis) -> str:
    info: dict[str, Any] = await r.info("server")
    return str(info["run_id"])


WIPES = ("flushdb", "flushall", "swapdb")


async def _wipe_calls(r: Redis) -> dict[str, int]:
    """How many times each dataset-wide command ran since the counters were last reset."""
    info: dict[str, Any] = await r.info("commandstats")
    return {c: int(info.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in WIPES}


class Bridge:
    """Copies keyspace notifications of the source into the change stream, and heals gaps."""

    def __init__(self, cfg: BridgeConfig, metrics: Metrics | None = None) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._own = cfg.own
        self._db = url_db(cfg.source_url)
        self._log = get_logger("bridge", stream=self._own.stream)
        self._gaps = Gaps(self._log)
        self._producers: anyio.CancelScope | None = None
        self._stop_requested = False
        self._subscribed = False
        self._run_ids: dict[str, str] = {}
        self._wipes: dict[str, dict[str, int]] = {}  # commandstats calls of WIPES, per Redis
        self._group_needed = False
        self._clients: dict[int, Redis] = {}
        self._source: Redis | None = None
        self._stream: Redis | None = None
        self._leadership: Leadership | None = None
        self._announced = False
        self._term_reason = "startup"
        # A Redis Cluster source: its masters, each with a subscription of its own.
        self._cluster = (
            ClusterNodes(cfg.source_url, tls=cfg.tls, log=self._log) if cfg.source_cluster else None
        )

    def stop(self) -> None:
        """Ask ``run`` to stop reading, write what it already read, and return."""
        self._stop_requested = True
        if self._producers is not None:
            self._producers.cancel()
        if self._leadership is not None:
            self._leadership.stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()`` (then return normally) or cancellation.

        Raises ``DependencyError`` when the source or stream Redis is unreachable at start, and
        ``NotificationsRefused`` when keyspace notifications cannot be enabled. Calls
        ``task_status.started()`` once subscribed, before the startup rescan finishes, or once
        standing by while another bridge leads (see :mod:`rrb_streams.backup.leader`).
        """
        cfg = self._cfg
        self._source = source = connect(cfg.source_url, name="rrb-bridge", tls=cfg.tls)
        self._clients[self._db] = source
        self._stream = (
            source
            if cfg.stream_url is None and self._cluster is None
            else connect_own(cfg.effective_stream_url, self._own, name="rrb-bridge", tls=cfg.tls)
        )
        subscriber = connect(cfg.source_url, name="rrb-bridge-sub", tls=cfg.tls)
        try:
            await self._prepare(source, self._stream)
            self._leadership = Leadership(
                self._stream,
                self._own,
                lease_s=cfg.leader_lease,
                log=self._log,
                lapsed=lambda: self._gaps.report("lease_lapsed"),
            )
            if self._metrics is not None:
                leadership = self._leadership
                self._metrics.part(BridgeMetrics).watch_leadership(lambda: leadership.leading)
            if self._stop_requested:
                self._leadership.stop()
            await self._leadership.serve(
                lambda reason: self._lead(subscriber, reason, task_status),
                standing_by=lambda: self._announce(task_status),
            )
            self._announce(task_status)  # stopped before subscribing: nothing left to wait for
            self._log.info("bridge.stopped")
        finally:
            with anyio.move_on_after(5, shield=True):
                for client in {id(c): c for c in (*self._clients.values(), self._stream)}.values():
                    await client.aclose()
                await subscriber.aclose()
                if self._cluster is not None:
                    await self._cluster.close()

    async def _lead(self, subscriber: Redis, reason: str, task_status: TaskStatus[None]) -> None:
        """One term as the leader: subscribe, rescan (for ``reason``), forward events and heal
        gaps until ``stop()``; then write what was read and return. Cancelled when the lease
        is lost, dropping whatever it holds: the next leader's rescan covers it."""
        cfg = self._cfg
        assert self._stream is not None
        self._gaps = Gaps(self._log)
        self._subscribed = False
        self._term_reason = reason
        send, receive = anyio.create_memory_object_stream[NewEntry](cfg.batch_size)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop, receive)
            # Producers share ``send``; closing it once they are all done lets the writer
            # drain what is buffered and return.
            async with send:
                with anyio.CancelScope() as self._producers:
                    if self._stop_requested:
                        self._producers.cancel()
                    async with anyio.create_task_group() as producers:
                        if self._cluster is None:
                            await producers.start(self._subscribe_loop, subscriber, send)
                        else:
                            await producers.start(self._subscribe_cluster, self._cluster, send)
                        self._announce(task_status)
                        rescanner = Rescanner(
                            cfg,
                            self._gaps,
                            self._client,
                            self._stream,
                            self._log,
                            metrics=self._metrics,
                            cluster=self._cluster,
                        )
                        producers.start_soon(rescanner.run, send)
                        producers.start_soon(self._watch_loop)

    def _retrying(self, stage: str) -> Retrying:
        return Retrying(
            self._log, "bridge", stage, cap=self._cfg.max_backoff, metrics=self._metrics
        )

    def _announce(self, task_status: TaskStatus[None]) -> None:
        """``task_status.started()``, once: when first leading, or first standing by."""
        if not self._announced:
            self._announced = True
            task_status.started()

    async def _prepare(self, source: Redis, stream: Redis) -> None:
        cfg = self._cfg
        await ping(source, cfg.source_url, "source Redis")
        if stream is not source:
            await ping(stream, cfg.effective_stream_url, "stream Redis")
        try:
            if self._cluster is not None:
                await self._cluster.prepare(notifications=not cfg.assume_notifications)
            elif not cfg.assume_notifications:
                await self._ensure_notifications(source)
            if self._cluster is None:
                self._run_ids["source"] = await _run_id(source)
                self._wipes["source"] = await _wipe_calls(source)
        except TRANSIENT as exc:
            where = redact_url(cfg.source_url)
            raise DependencyError(f"source Redis at {where} failed at start: {exc}") from exc
        try:
            await ensure_group(stream, self._own.stream, DEFAULT_GROUP)
            if stream is not source:
                self._run_ids["stream"] = await _run_id(stream)
                self._wipes["stream"] = await _wipe_calls(stream)
        except TRANSIENT as exc:
            where = redact_url(cfg.effective_stream_url)
            raise DependencyError(f"cannot prepare the change stream at {where}: {exc}") from exc

    async def _ensure_notifications(self, source: Redis) -> None:
        value = await ensure_notifications(source)
        if value is not None:
            self._log.info("bridge.notifications_enabled", notify_keyspace_events=value)

    # -- live events -----------------------------------------------------------------------

    async def _subscribe_loop(
        self,
        subscriber: Redis,
        send: MemoryObjectSendStream[NewEntry],
        on_confirmed: Callable[[], Awaitable[None]] | None = None,
        where: str | None = None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe ``subscriber`` (the source's, or ``where``: a cluster node's) and forward
        its events, for ever; ``on_confirmed`` runs on each confirmed subscription (by
        default :meth:`_on_subscribed`)."""
        cfg = self._cfg
        db = None if cfg.all_dbs else self._db
        channel = channel_pattern(db, cfg.pattern)
        patterns = channel_patterns(db, cfg.pattern, self._own.prefix)
        retrying = self._retrying("subscribe")
        while True:
            pubsub = subscriber.pubsub()
            error: BaseException | None = None
            try:
                await pubsub.psubscribe(*patterns)
                while True:
                    message = await pubsub.get_message(timeout=_READ_TIMEOUT)
                    if message is None:
                        continue
                    if message["type"] == "pmessage":
                        await self._forward(send, message["channel"], message["data"])
                    elif message["type"] == "psubscribe" and message["data"] == len(patterns):
                        # Also read after redis-py's own silent reconnect: its connect callback
                        # re-sends PSUBSCRIBE, and this confirmation (of the last pattern: only
                        # then are events of every watched key on their way) is how we learn
                        # of it.
                        if on_confirmed is None:
                            await self._on_subscribed(channel, task_status)
                        else:
                            await on_confirmed()
                        retrying.succeeded("subscriber")
            except ResponseError as exc:
                if len(patterns) > 1:
                    # ACLs match pattern subscriptions literally, so a user allowed only the
                    # plain pattern is refused these: take it, and drop own keys' events here.
                    self._log.info("bridge.own_events_unfiltered", channel=channel, error=str(exc))
                    patterns = [channel]
                elif not self._subscribed:
                    raise DependencyError(
                        f"source Redis at {redact_url(where or cfg.source_url)} refused "
                        f"PSUBSCRIBE {channel}: {exc}"
                    ) from exc
                else:
                    error = exc
            except TRANSIENT as exc:
                error = exc
            finally:
                with anyio.move_on_after(5, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if error is not None:
                await retrying.failed("subscriber", error)

    async def _subscribe_cluster(
        self,
        cluster: ClusterNodes,
        send: MemoryObjectSendStream[NewEntry],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe on every master of the cluster, following the topology: a master that
        appears (a failover, a node added) is subscribed and is a gap; one that is no longer
        a master is dropped. Started once every master is subscribed."""
        cfg = self._cfg
        scopes: dict[Address, anyio.CancelScope] = {}
        confirmed: set[Address] = set()
        initial: set[Address] = set()
        retrying = self._retrying("topology")

        def maybe_started() -> None:
            if not self._subscribed and initial and initial <= confirmed:
                self._subscribed = True
                self._log.info("bridge.subscribed", masters=len(confirmed))
                task_status.started()
                self._gaps.report(self._term_reason)

        async def on_node(address: Address) -> None:
            if address in confirmed:  # subscribed again: events were missed meanwhile
                cluster.forget(address)  # a restarted node has its config file's flags
                self._gaps.report("reconnect", node=address)
            elif self._subscribed:
                confirmed.add(address)
                self._gaps.report("cluster_master", node=address)
            else:
                confirmed.add(address)
                maybe_started()

        async def one(address: Address, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
            subscriber = connect(cluster.url_of(address), name="rrb-bridge-sub", tls=cfg.tls)
            try:
                with anyio.CancelScope() as scope:
                    task_status.started(scope)
                    await self._subscribe_loop(
                        subscriber,
                        send,
                        functools.partial(on_node, address),
                        cluster.url_of(address),
                    )
            finally:
                with anyio.move_on_after(5, shield=True):
                    await subscriber.aclose()

        async with anyio.create_task_group() as tg:
            while True:
                try:
                    topology = await cluster.refresh()
                except TRANSIENT as exc:
                    await retrying.failed("topology", exc)
                    continue
                retrying.succeeded("topology")
                masters = {m.address for m in topology.masters}
                for address in set(scopes) - masters:  # demoted or gone
                    scopes.pop(address).cancel()
                    confirmed.discard(address)
                for node in topology.nodes:
                    if not cfg.assume_notifications:
                        await cluster.configure(node)
                for address in sorted(masters - set(scopes)):
                    scopes[address] = await tg.start(one, address)
                if not self._subscribed:  # the masters of now: a dead one may be replaced
                    initial.clear()
                    initial.update(masters)
                    maybe_started()
                await anyio.sleep(cfg.topology_interval)

    async def _on_subscribed(self, channel: str, task_status: TaskStatus[None]) -> None:
        if self._subscribed:
            # A restarted source comes back with the flags of its redis.conf.
            if not self._cfg.assume_notifications:
                assert self._source is not None
                await self._ensure_notifications(self._source)
            self._log.info("bridge.subscribed", channel=channel)
            self._gaps.report("reconnect")
            return
        self._subscribed = True
        self._log.info("bridge.subscribed", channel=channel)
        task_status.started()
        self._gaps.report(self._term_reason)

    async def _forward(
        self, send: MemoryObjectSendStream[NewEntry], channel: bytes, event: bytes
    ) -> None:
        parsed = parse_channel(channel)
        if parsed is None:
            return
        db, key = parsed
        if self._own.is_own(key):
            return  # our own stream and leases: never backed up, and XADD would feed back
        await send.send((db, key, event.decode(errors="replace"), now_ms()))

    def _client(self, db: int) -> Redis:
        if db not in self._clients:
            self._clients[db] = connect(
                self._cfg.source_url, db=db, name="rrb-bridge", tls=self._cfg.tls
            )
        return self._clients[db]

    # -- restarts ----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        assert self._source is not None and self._stream is not None
        while True:
            await anyio.sleep(self._cfg.watch_interval)
            for name, client, node in self._watched():
                kind = "stream" if name == "stream" else "source"
                try:
                    run_id = await _run_id(client)
                    wipes = await _wipe_calls(client)
                except TRANSIENT as exc:
                    self._log.debug("bridge.watch_failed", redis=name, error=str(exc))
                    continue
                known = self._run_ids.get(name)
                self._run_ids[name] = run_id
                if known is not None and known != run_id:
                    # An empty restarted stream Redis would otherwise hold entries no group keeps.
                    self._group_needed = self._group_needed or client is self._stream
                    self._gaps.report(
                        f"{kind}_restart", node=node, run_id=run_id, previous_run_id=known
                    )
                    self._wipes[name] = wipes  # a restart resets the counters
                    continue
                seen = self._wipes.get(name)
                self._wipes[name] = wipes
                if seen is not None and wipes != seen:
                    ran = {c: wipes[c] - seen[c] for c in WIPES if wipes[c] != seen[c]}
                    # A wiped stream Redis lost its group with the stream.
                    self._group_needed = self._group_needed or client is self._stream
                    self._gaps.report(f"{kind}_wipe", node=node, commands=ran)
            if self._group_needed:
                try:
                    await ensure_group(self._stream, self._own.stream, DEFAULT_GROUP)
                    self._group_needed = False
                except TRANSIENT as exc:
                    self._log.debug("bridge.watch_failed", redis="stream", error=str(exc))

    def _watched(self) -> list[tuple[str, Redis, Address | None]]:
        """The Redis servers whose restarts and wipes are gaps: (name, client, node). In a
        cluster, every master is watched on its own, and its gaps owe a rescan of its keys
        only; the stream's Redis owes a rescan of everything."""
        assert self._source is not None and self._stream is not None
        out: list[tuple[str, Redis, Address | None]] = []
        if self._cluster is None:
            out.append(("source", self._source, None))
        else:
            for master in self._cluster.masters():
                client = self._cluster.client(master.address)
                out.append((f"source {master}", client, master.address))
        if self._stream is not self._source:
            out.append(("stream", self._stream, None))
        return out

    # -- the writer --------------------------------------------------------------------------

    async def _write_loop(self, receive: MemoryObjectReceiveStream[NewEntry]) -> None:
        retrying = self._retrying("write")
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except anyio.EndOfStream:
                    return
                while len(batch) < self._cfg.batch_size:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._write(batch, retrying)

    async def _write(self, batch: list[NewEntry], retrying: Retrying) -> None:
        """XADD ``batch`` in one fenced script call, retrying until it is in (a retry may
        duplicate entries, which is harmless: uploaders read the key's current state). If
        another bridge leads, nothing is written and the term is cancelled."""
        assert self._leadership is not None
        entries = [entry_pairs(*c) for c in batch]
        while True:
            try:
                written = await self._leadership.xadd(entries)
            except TRANSIENT as exc:
                await retrying.failed("writer", exc)
                continue
            retrying.succeeded("writer")
            if not written:
                return
            if self._metrics is not None:
                self._metrics.part(BridgeMetrics).bridged(batch)
            self._log.debug("bridge.batch_written", entries=len(batch))
            return
