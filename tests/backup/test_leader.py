"""The bridges' leader lease against a real redis-server: exclusive, renewed, fenced, released."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.leader import Leadership
from rrb_streams.cli.backup import bridge, rrb
from rrb_streams.config import BridgeConfig
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.wire.entries import entry_fields, parse_entry
from rrb_streams.wire.keys import OwnKeys
from tests.support.proc import Command
from tests.support.servers import RedisServer
from tests.support.wait import until, wait_for, wait_log

OWN = OwnKeys()
KEY = OWN.leader


@asynccontextmanager
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(server.url())
    try:
        yield r
    finally:
        await r.aclose()


def leadership(r: Redis, lease: float, **kwargs: Any) -> Leadership:
    return Leadership(r, OWN, lease_s=lease, log=get_logger("bridge"), **kwargs)


def entry(key: bytes) -> tuple[bytes, ...]:
    return tuple(x for pair in entry_fields(0, key, "set", 1).items() for x in pair)


def test_leader_key_is_under_the_own_prefix() -> None:
    assert OwnKeys().leader == "rrb:bridge:leader"
    assert OwnKeys("x:").leader == "x:bridge:leader"


@pytest.mark.anyio
async def test_leader_lease_is_exclusive_and_names_its_holder(redis_server: RedisServer) -> None:
    async with client(redis_server) as r:
        a, b = leadership(r, 5), leadership(r, 5)
        assert a.token != b.token
        assert a.token.startswith(f"{socket.gethostname()}-{os.getpid()}-")
        assert (await a.claim()).held
        assert (await a.claim()).held  # a retried claim of our own lease
        claim = await b.claim()
        assert not claim.held and claim.holder == a.token
        assert claim.ttl_s is not None and 4 < claim.ttl_s <= 5
        assert await r.get(KEY) == a.token.encode()


@pytest.mark.anyio
async def test_leader_renews_its_lease_and_releases_it_on_stop(redis_server: RedisServer) -> None:
    async with client(redis_server) as r:
        a, b = leadership(r, 0.3), leadership(r, 0.3)
        terms: dict[str, list[str]] = {"a": [], "b": []}
        stop_a = anyio.Event()

        async def term_a(reason: str) -> None:
            terms["a"].append(reason)
            await stop_a.wait()

        async def term_b(reason: str) -> None:
            terms["b"].append(reason)
            await anyio.sleep_forever()

        with capture_logs() as logs, anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.serve, term_a)
                await wait_log(logs, event="bridge.became_leader", token=a.token)
                tg.start_soon(b.serve, term_b)
                await anyio.sleep(1.5)  # five leases: only renewal keeps it
                assert await r.get(KEY) == a.token.encode()
                assert terms == {"a": ["startup"], "b": []}
                a.stop()
                stop_a.set()
                await wait_log(logs, event="bridge.lease_released", token=a.token, released=True)
                stopped = anyio.current_time()
                await wait_log(logs, event="bridge.became_leader", token=b.token)
                # Released, not lapsed: b's next try (at most a third of the lease) takes it.
                assert anyio.current_time() - stopped < 0.3
                assert terms["b"] == ["takeover"]
                tg.cancel_scope.cancel()
        assert await r.get(KEY) is None  # b let go as well, cancelled
        assert any(e["event"] == "bridge.standby" and e["leader"] == a.token for e in logs)


@pytest.mark.anyio
async def test_leader_whose_lease_lapsed_cannot_write_through_the_fenced_script(
    redis_server: RedisServer,
) -> None:
    async with client(redis_server) as r:
        old, new = leadership(r, 0.2), leadership(r, 5)
        assert (await old.claim()).held
        assert await old.xadd([entry(b"before")])
        await anyio.sleep(0.3)  # the old leader "paused" past its lease
        assert (await new.claim()).held
        with capture_logs() as logs:
            assert not await old.xadd([entry(b"stale:1"), entry(b"stale:2")])
            assert not (await old.renew()).ours
        assert [e["leader"] for e in logs if e["event"] == "bridge.leadership_lost"] == [new.token]
        assert not old.leading
        assert await new.xadd([entry(b"after")])
        keys = [parse_entry(i, f).key for i, f in await r.xrange(OWN.stream)]
        assert keys == [b"before", b"after"]
        assert await r.get(KEY) == new.token.encode()


@pytest.mark.anyio
async def test_leader_takes_back_a_lapsed_lease_nobody_took_and_reports_the_lapse(
    redis_server: RedisServer,
) -> None:
    lapses: list[int] = []
    async with client(redis_server) as r:
        a = leadership(r, 0.2, lapsed=lambda: lapses.append(1))
        assert (await a.claim()).held
        await anyio.sleep(0.3)
        assert await r.get(KEY) is None
        assert await a.xadd([entry(b"k")])
        assert lapses == [1]
        assert await r.get(KEY) == a.token.encode()
        assert 0 < await r.pttl(KEY) <= 200
        await r.delete(KEY)  # as a restarted stream Redis without persistence would
        held = await a.renew()
        assert held.ours and held.retaken
        assert await r.xlen(OWN.stream) == 1


@pytest.mark.anyio
async def test_leader_that_loses_its_lease_cancels_its_term_and_stands_by_again(
    redis_server: RedisServer,
) -> None:
    async with client(redis_server) as r:
        a = leadership(r, 0.3)
        reasons: list[str] = []
        cancelled: list[str] = []

        async def term(reason: str) -> None:
            reasons.append(reason)
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(reason)

        with capture_logs() as logs, anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.serve, term)
                await wait_log(logs, event="bridge.became_leader", reason="startup")
                await r.set(KEY, "someone-else", px=600)
                await wait_log(logs, event="bridge.leadership_lost", leader="someone-else")
                await wait_log(logs, event="bridge.standby", leader="someone-else")
                assert cancelled == ["startup"]
                await wait_log(logs, event="bridge.became_leader", reason="takeover")
                assert reasons == ["startup", "takeover"]
                tg.cancel_scope.cancel()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


@pytest.mark.anyio
async def test_leader_at_start_replaces_a_dead_process_of_this_host_at_once(
    redis_server: RedisServer, dead_pid: int
) -> None:
    host = socket.gethostname()
    async with client(redis_server) as r:

        async def first_term(holder: str) -> tuple[str, float]:
            await r.set(KEY, holder, px=60_000)
            a = leadership(r, 60)
            reasons: list[str] = []

            async def term(reason: str) -> None:
                reasons.append(reason)
                a.stop()

            started = anyio.current_time()
            with anyio.move_on_after(1):
                await a.serve(term)
            return (reasons[0] if reasons else "none"), anyio.current_time() - started

        # A pid that no longer runs, and this very pid under a token none of ours has: a
        # restarted container's bridge often gets the pid its predecessor had.
        for holder in (f"{host}-{dead_pid}-00000000", f"{host}-{os.getpid()}-00000000"):
            reason, seconds = await first_term(holder)
            assert reason == "startup" and seconds < 0.5, holder
        # A live process, another host, or a name that is not a bridge's: wait for the lease.
        for holder in (f"{host}-1-00000000", f"elsewhere-{dead_pid}-00000000", "manual"):
            reason, _ = await first_term(holder)
            assert reason == "none", holder


def config(server: RedisServer, **kwargs: Any) -> BridgeConfig:
    return BridgeConfig(
        source_url=server.url(), watch_interval=0.2, max_backoff=0.5, **kwargs
    ).validate()


@pytest.mark.anyio
async def test_two_bridges_only_the_leader_writes_and_a_stopped_leader_hands_over(
    redis_server: RedisServer,
) -> None:
    m1, m2 = Metrics(), Metrics()
    first = Bridge(config(redis_server, leader_lease=1), metrics=m1)
    second = Bridge(config(redis_server), metrics=m2)

    def leading() -> list[float | None]:
        return [m.registry.get_sample_value("rrb_bridge_leader") for m in (m1, m2)]

    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg, client(redis_server) as r:
            await tg.start(first.run)
            await wait_log(logs, event="bridge.rescan_done", reasons=["startup"])
            await tg.start(second.run)  # returns once it stands by
            await wait_log(logs, event="bridge.standby")
            await r.set("once", "v")

            async def entries(key: bytes) -> int:
                got = [parse_entry(i, f) for i, f in await r.xrange(OWN.stream)]
                return sum(c.key == key for c in got)

            async def arrived(key: bytes) -> None:
                await until(lambda: entries(key), within=5, interval=0.05)

            await arrived(b"once")
            await anyio.sleep(0.5)
            assert await entries(b"once") == 1  # both are subscribed; one writes
            assert leading() == [1.0, 0.0]
            first.stop()
            await wait_log(logs, event="bridge.rescan_done", reasons=["takeover"])
            assert leading() == [0.0, 1.0]
            await r.set("after", "v")
            await arrived(b"after")
            second.stop()
    leaders = [e for e in logs if e["event"] == "bridge.became_leader"]
    assert [e["reason"] for e in leaders] == ["startup", "takeover"]
    assert leaders[0]["token"] != leaders[1]["token"]


def test_rrb_bridge_stopped_by_sigterm_releases_the_lease(
    redis_server: RedisServer, commands: list[Command], tmp_path: Path
) -> None:
    log = tmp_path / "bridge.log"
    process = Command("rrb-bridge", redis_server.url(), log=log, LOG_LEVEL="INFO")
    commands.append(process.start())
    with redis_server.client() as c:
        wait_for(lambda: c.get(KEY) is not None)
        assert c.get(KEY).decode().startswith(f"{socket.gethostname()}-{process.pid}-")
        assert process.terminate(15) == 0, process.output()
        assert c.get(KEY) is None
    assert "bridge.lease_released" in process.output()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("command", [bridge, rrb])
def test_leader_lease_option_rejects_bad_values_with_exit_2(
    command: Callable[[list[str]], int], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(command(["redis://127.0.0.1:1/0", "--leader-lease", value]))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--leader-lease" in err[0], err
