"""Gaps and Rescanner against real redis-server processes, read from the rescanner's channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from redis.asyncio import Redis
from structlog.testing import capture_logs

from rrb_streams.backup.rescan import Gaps, Rescanner
from rrb_streams.config import BridgeConfig
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.wire.connections import connect
from rrb_streams.wire.entries import SCAN_EVENT, NewEntry, now_ms
from rrb_streams.wire.keys import OwnKeys
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

OWN = OwnKeys()
Factory = Callable[..., RedisServer]
Logs = Sequence[MutableMapping[str, Any]]


def config(server: RedisServer, db: int = 0, **kwargs: Any) -> BridgeConfig:
    kwargs.setdefault("max_backoff", 0.05)
    kwargs.setdefault("scan_pause", 0.0)
    return BridgeConfig(source_url=server.url(db), **kwargs).validate()


def events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


@dataclass
class Rescan:
    """A rescanner running in the background: report gaps to ``gaps``; what it sent lands in
    ``received`` (all of it once the ``rescanning`` block has ended)."""

    gaps: Gaps
    receive: MemoryObjectReceiveStream[NewEntry]
    reading: anyio.Event
    received: list[NewEntry] = field(default_factory=list)

    def keys(self, db: int = 0) -> list[bytes]:
        return [key for d, key, _, _ in self.received if d == db]


@asynccontextmanager
async def rescanning(
    cfg: BridgeConfig,
    *,
    stream_url: str | None = None,
    source_url: str | None = None,
    buffer: int = 10_000,
    read: bool = True,
    metrics: Metrics | None = None,
    within: float = 20,
) -> AsyncIterator[Rescan]:
    """``Rescanner.run`` for the block, its source clients made from ``source_url`` (the
    config's by default). With ``read=False`` nothing reads the channel until
    ``reading.set()``, so a small ``buffer`` holds the rescanner mid-scan."""
    log = get_logger("bridge")
    clients: dict[int, Redis] = {}

    def client(db: int) -> Redis:
        if db not in clients:
            clients[db] = connect(source_url or cfg.source_url, db=db)
        return clients[db]

    stream = connect(stream_url or cfg.effective_stream_url)
    send, receive = anyio.create_memory_object_stream[NewEntry](buffer)
    gaps = Gaps(log)
    scan = Rescan(gaps, receive, anyio.Event())
    if read:
        scan.reading.set()

    async def reader() -> None:
        await scan.reading.wait()
        async with receive:
            async for change in receive:
                scan.received.append(change)

    rescanner = Rescanner(cfg, gaps, client, stream, log, metrics=metrics)
    try:
        with anyio.fail_after(within):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                async with send, anyio.create_task_group() as scanning:
                    scanning.start_soon(rescanner.run, send)
                    try:
                        yield scan
                    finally:
                        scanning.cancel_scope.cancel()
                scan.reading.set()
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
            for r in clients.values():
                await r.aclose()


async def rescans_done(logs: Logs, n: int = 1) -> list[MutableMapping[str, Any]]:
    await until(lambda: len(events(logs, "bridge.rescan_done")) >= n)
    return events(logs, "bridge.rescan_done")


# -- Gaps -----------------------------------------------------------------------------------


async def test_gaps_wait_returns_the_reasons_since_the_last_call_in_order_without_repeats() -> None:
    with capture_logs() as logs:
        gaps = Gaps(get_logger("bridge"))
        gaps.report("startup")
        gaps.report("reconnect", attempt=2)
        gaps.report("startup")
        assert gaps.generation == 3
        with anyio.fail_after(5):
            assert await gaps.wait() == ["startup", "reconnect"]
            gaps.report("restart", run_id="abc")
            assert await gaps.wait() == ["restart"]
    assert gaps.generation == 4
    detected = events(logs, "bridge.gap_detected")
    assert [e["reason"] for e in detected] == ["startup", "reconnect", "startup", "restart"]
    assert detected[1]["attempt"] == 2 and detected[3]["run_id"] == "abc"


async def test_gaps_wait_blocks_until_a_gap_is_reported() -> None:
    gaps = Gaps(get_logger("bridge"))
    with anyio.move_on_after(0.05) as idle:
        await gaps.wait()
    assert idle.cancelled_caught, "wait() returned with no gap reported"
    got: list[list[str]] = []

    async def waiter() -> None:
        got.append(await gaps.wait())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            gaps.report("reconnect")
    assert got == [["reconnect"]]
    with anyio.move_on_after(0.05) as again:
        await gaps.wait()
    assert again.cancelled_caught, "a gap is reported to one wait() only"


# -- what a rescan sends --------------------------------------------------------------------


async def test_rescanner_sends_one_scan_entry_per_watched_key_and_skips_own_keys(
    redis_server: RedisServer,
) -> None:
    names = [b"key:%d" % i for i in range(20)]
    with redis_server.client() as c:
        c.mset(dict.fromkeys(names, b"v"))
        c.xadd(OWN.stream, {"f": "v"})
        c.set(OWN.lease(0, "abc"), "token")
        c.hset(OWN.index(0), "key:0", "digest")  # a live key: not gone
    before = now_ms()
    with capture_logs() as logs:
        async with rescanning(config(redis_server, scan_count=3)) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    after = now_ms()
    assert sorted(scan.keys()) == sorted(names), "every key exactly once, no own key"
    assert all(ev == SCAN_EVENT and before <= t <= after for _, _, ev, t in scan.received)
    assert done["reasons"] == ["startup"]
    assert (done["keys"], done["gone"], done["skipped_own"]) == (20, 0, 3)
    assert done["dbs"] == [0]
    assert done["seconds"] >= 0
    assert not events(logs, "bridge.rescan_restarted")


async def test_rescanner_sends_indexed_keys_the_source_no_longer_holds(
    redis_factory: Factory,
) -> None:
    source, stream = redis_factory(), redis_factory()
    with source.client() as c:
        c.set("live", "v")
    with stream.client() as s:
        s.hset(
            OWN.index(0),
            mapping={"live": "d", "gone:1": "d", "gone:2": "-", OWN.lease(0, "x"): "d"},
        )
        s.hset(OWN.index(1), "gone:other-db", "d")
    with capture_logs() as logs:
        async with rescanning(config(source), stream_url=stream.url()) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    assert sorted(scan.keys()) == [b"gone:1", b"gone:2", b"live"]
    assert all(db == 0 and ev == SCAN_EVENT for db, _, ev, _ in scan.received)
    assert (done["keys"], done["gone"], done["skipped_own"]) == (1, 2, 0)


async def test_rescanner_pattern_limits_the_scan_and_the_index_walk(
    redis_factory: Factory,
) -> None:
    source, stream = redis_factory(), redis_factory()
    with source.client() as c:
        c.mset({"user:1": "v", "user:2": "v", "other:1": "v"})
    with stream.client() as s:
        s.hset(OWN.index(0), mapping={"user:1": "d", "user:gone": "d", "other:gone": "d"})
    cfg = config(source, pattern="user:*")
    with capture_logs() as logs:
        async with rescanning(cfg, stream_url=stream.url()) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    assert sorted(scan.keys()) == [b"user:1", b"user:2", b"user:gone"]
    assert (done["keys"], done["gone"]) == (2, 1)


async def test_rescanner_covers_only_the_urls_db_without_all_dbs(redis_factory: Factory) -> None:
    source, stream = redis_factory(), redis_factory()
    with source.client(2) as c2, source.client(0) as c0:
        c2.mset({"a": "v", "b": "v"})
        c0.set("elsewhere", "v")
    with stream.client() as s:
        s.hset(OWN.index(2), "gone:2", "d")
        s.hset(OWN.index(0), "gone:0", "d")
    with capture_logs() as logs:
        async with rescanning(config(source, db=2), stream_url=stream.url()) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    assert {(db, key) for db, key, _, _ in scan.received} == {
        (2, b"a"),
        (2, b"b"),
        (2, b"gone:2"),
    }
    assert done["dbs"] == [2]


async def test_rescanner_all_dbs_covers_every_db_with_keys_or_an_index(
    redis_factory: Factory,
) -> None:
    source, stream = redis_factory(), redis_factory()
    with source.client(0) as c0, source.client(3) as c3:
        c0.set("zero", "v")
        c3.mset({"three:a": "v", "three:b": "v"})
    with stream.client() as s:
        s.hset(OWN.index(5), "flushed", "d")  # db 5 holds no keys any more
        s.hset(OWN.index(3), "three:gone", "d")
    cfg = config(source, all_dbs=True)
    with capture_logs() as logs:
        async with rescanning(cfg, stream_url=stream.url()) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    assert {(db, key) for db, key, _, _ in scan.received} == {
        (0, b"zero"),
        (3, b"three:a"),
        (3, b"three:b"),
        (3, b"three:gone"),
        (5, b"flushed"),
    }
    assert len(scan.received) == 5
    assert done["dbs"] == [0, 3, 5]
    assert (done["keys"], done["gone"]) == (3, 2)


async def test_rescanner_all_dbs_assumes_16_dbs_when_config_is_refused(
    redis_factory: Factory,
) -> None:
    source = redis_factory("--rename-command", "CONFIG", "")
    stream = redis_factory()
    with stream.client() as s:
        s.hset(OWN.index(15), "in-db-15", "d")
    cfg = config(source, all_dbs=True)
    with capture_logs() as logs:
        async with rescanning(cfg, stream_url=stream.url()) as scan:
            scan.gaps.report("startup")
            [done] = await rescans_done(logs)
    assert done["dbs"] == [15]
    assert [(db, key) for db, key, _, _ in scan.received] == [(15, b"in-db-15")]


# -- when it runs ---------------------------------------------------------------------------


async def test_rescanner_runs_one_rescan_per_burst_of_gaps(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.mset({"a": "v", "b": "v"})
    metrics = Metrics()
    with capture_logs() as logs:
        async with rescanning(config(redis_server), metrics=metrics) as scan:
            scan.gaps.report("startup")
            scan.gaps.report("reconnect")
            scan.gaps.report("startup")
            [first] = await rescans_done(logs)
            await until(lambda: len(scan.received) == 2)
            scan.gaps.report("source_restart")
            _, second = await rescans_done(logs, 2)
            await until(lambda: len(scan.received) == 4)
    assert first["reasons"] == ["startup", "reconnect"]
    assert second["reasons"] == ["source_restart"]
    assert sorted(scan.keys()) == [b"a", b"a", b"b", b"b"]
    assert len(events(logs, "bridge.rescan_done")) == 2

    def rescans(reason: str) -> float | None:
        return metrics.registry.get_sample_value("rrb_bridge_rescans_total", {"reason": reason})

    assert (rescans("startup"), rescans("reconnect"), rescans("source_restart")) == (1, 1, 1)


async def test_rescanner_newer_gap_restarts_the_rescan_from_the_start(
    redis_server: RedisServer,
) -> None:
    names = {b"k%d" % i for i in range(40)}
    with redis_server.client() as c:
        c.mset(dict.fromkeys(names, b"v"))
    cfg = config(redis_server, scan_count=2)
    with capture_logs() as logs:
        async with rescanning(cfg, buffer=1, read=False) as scan:
            scan.gaps.report("startup")
            # The channel is full and the rescanner waits to send: it is mid-scan.
            await until(lambda: scan.receive.statistics().tasks_waiting_send == 1)
            scan.gaps.report("reconnect")
            scan.reading.set()
            [done] = await rescans_done(logs)
    assert len(events(logs, "bridge.rescan_restarted")) == 1
    assert done["reasons"] == ["startup", "reconnect"]
    assert done["keys"] == 40
    partial = len(scan.received) - 40
    assert 2 <= partial < 40, "the interrupted pass stopped after the page in hand"
    assert set(scan.keys()[-40:]) == names, "the rescan started over: every key once more"


async def test_rescanner_newer_gap_during_the_index_walk_restarts_the_rescan(
    redis_factory: Factory,
) -> None:
    source = redis_factory()
    stream = redis_factory("--hash-max-listpack-entries", "0")  # so HSCAN pages the index
    gone = {b"gone:%d" % i for i in range(40)}
    with source.client() as c:
        c.set("live", "v")
    with stream.client() as s:
        s.hset(OWN.index(0), mapping=dict.fromkeys(gone, b"d"))
    cfg = config(source, scan_count=2)
    with capture_logs() as logs:
        async with rescanning(cfg, stream_url=stream.url(), buffer=1, read=False) as scan:
            scan.gaps.report("startup")
            await until(lambda: scan.receive.statistics().tasks_waiting_send == 1)
            scan.gaps.report("reconnect")
            scan.reading.set()
            [done] = await rescans_done(logs)
    assert len(events(logs, "bridge.rescan_restarted")) == 1
    assert (done["keys"], done["gone"]) == (1, 40)
    partial = len(scan.received) - 41
    assert 1 <= partial < 41, "the interrupted walk stopped after the page in hand"
    assert set(scan.keys()[-41:]) == {b"live", *gone}


# -- failures -------------------------------------------------------------------------------


async def test_rescanner_retries_a_failed_scan_step_and_completes(
    redis_server: RedisServer,
) -> None:
    names = {b"k%d" % i for i in range(20)}
    with redis_server.client() as c:
        c.mset(dict.fromkeys(names, b"v"))
        c.acl_setuser("bridge", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
        user_url = f"redis://bridge:pw@127.0.0.1:{redis_server.port}/0"
        cfg = config(redis_server, scan_count=2)
        with capture_logs() as logs:
            async with rescanning(cfg, source_url=user_url, buffer=1, read=False) as scan:
                scan.gaps.report("startup")
                await until(lambda: scan.receive.statistics().tasks_waiting_send == 1)
                c.acl_setuser(
                    "bridge", enabled=True, commands=["-scan"]
                )  # the next SCAN step fails
                scan.reading.set()
                await until(lambda: events(logs, "bridge.retry"))
                c.acl_setuser("bridge", enabled=True, commands=["+scan"])
                [done] = await rescans_done(logs)
    retry = events(logs, "bridge.retry")[0]
    assert retry["stage"] == "rescan"
    assert retry["consecutive_errors"] == 1
    assert retry["error"].startswith("NoPermissionError")
    [recovered] = events(logs, "bridge.recovered")
    assert recovered["stage"] == "rescan"
    assert not events(logs, "bridge.rescan_restarted")
    assert done["keys"] == 20
    assert sorted(scan.keys()) == sorted(names), "the scan went on from where it failed"


async def test_rescanner_retries_a_failed_index_walk_and_completes(
    redis_factory: Factory,
) -> None:
    source, stream = redis_factory(), redis_factory()
    with source.client() as c:
        c.set("live", "v")
    with stream.client() as s:
        s.hset(OWN.index(0), mapping={"live": "d", "gone": "d"})
        s.acl_setuser(
            "bridge", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-hscan"]
        )
        user_url = f"redis://bridge:pw@127.0.0.1:{stream.port}/0"
        with capture_logs() as logs:
            async with rescanning(config(source), stream_url=user_url) as scan:
                scan.gaps.report("startup")
                await until(lambda: len(events(logs, "bridge.retry")) >= 2)
                assert not events(logs, "bridge.rescan_done")
                s.acl_setuser("bridge", enabled=True, commands=["+hscan"])
                [done] = await rescans_done(logs)
    assert {e["stage"] for e in events(logs, "bridge.retry")} == {"rescan"}
    assert [e["consecutive_errors"] for e in events(logs, "bridge.retry")[:2]] == [1, 2]
    assert len(events(logs, "bridge.recovered")) == 1
    assert (done["keys"], done["gone"]) == (1, 1)
    assert sorted(scan.keys()) == [b"gone", b"live"]
