"""The bridge against real redis-server processes: events, rescans, restarts, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from rrb_streams.backup.bridge import Bridge
from rrb_streams.config import BridgeConfig
from rrb_streams.errors import DependencyError, NotificationsRefused
from rrb_streams.wire.entries import Change, parse_entry
from rrb_streams.wire.keys import OwnKeys
from tests.support import pipeline
from tests.support.proc import Command
from tests.support.servers import RedisServer, free_port
from tests.support.wait import until, wait_for, wait_log

pytestmark = pytest.mark.anyio

STREAM = OwnKeys().stream
Factory = Callable[..., RedisServer]


def config(server: RedisServer, db: int = 0, **kwargs: Any) -> BridgeConfig:
    kwargs.setdefault("watch_interval", 0.2)
    kwargs.setdefault("max_backoff", 0.5)
    return BridgeConfig(source_url=server.url(db), **kwargs).validate()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(url)
    try:
        yield r
    finally:
        await r.aclose()


def running(cfg: BridgeConfig) -> AbstractAsyncContextManager[None]:
    """A bridge running in this test's task group; stopped (and awaited) on the way out."""
    return pipeline.running(Bridge(cfg))


async def changes(r: Redis, after: str = "-") -> list[Change]:
    return [parse_entry(i, f) for i, f in await r.xrange(STREAM, min=after)]


async def wait_changes(
    r: Redis, predicate: Callable[[list[Change]], bool], after: str = "-", within: float = 10
) -> list[Change]:
    got: list[Change] = []

    async def satisfied() -> bool:
        nonlocal got
        got = await changes(r, after)
        return predicate(got)

    try:
        await until(satisfied, within=within, interval=0.05)
    except TimeoutError:
        pytest.fail(f"stream never satisfied the test; it holds {[(c.key, c.event) for c in got]}")
    return got


def has(*pairs: tuple[bytes, str]) -> Callable[[list[Change]], bool]:
    return lambda got: set(pairs) <= {(c.key, c.event) for c in got}


async def last_id(r: Redis) -> str:
    (entry,) = await r.xrevrange(STREAM, count=1)
    return str(entry[0].decode())


# -- notifications --------------------------------------------------------------------------


async def test_bridge_extends_notifications_without_dropping_flags(redis_factory: Factory) -> None:
    server = redis_factory("--notify-keyspace-events", "Ex")
    async with running(config(server)), client(server.url()) as r:
        value = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    assert {"E", "x", "K"} <= set(value)
    assert "A" in value or set("g$lshzxet") <= set(value)
    assert "m" not in value


async def test_bridge_leaves_sufficient_notifications_untouched(redis_factory: Factory) -> None:
    server = redis_factory("--notify-keyspace-events", "KEA")
    with capture_logs() as logs:
        async with running(config(server)), client(server.url()) as r:
            stats = await r.info("commandstats")
            value = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    assert "cmdstat_config|set" not in stats
    assert value == "AKE"
    assert not [e for e in logs if e["event"] == "bridge.notifications_enabled"]


async def test_bridge_refused_config_names_the_setting(redis_factory: Factory) -> None:
    server = redis_factory("--rename-command", "CONFIG", "")
    with anyio.fail_after(10), pytest.raises(NotificationsRefused) as exc_info:
        await Bridge(config(server)).run()
    message = str(exc_info.value)
    assert "notify-keyspace-events KA" in message
    assert "\n" not in message


async def test_bridge_refused_config_by_acl_names_the_union(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.config_set("notify-keyspace-events", "Ex")
        c.acl_setuser(
            "backup",
            enabled=True,
            passwords=["+s3cret-pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config|set"],
        )
    url = f"redis://backup:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    with anyio.fail_after(10), pytest.raises(NotificationsRefused) as exc_info:
        await Bridge(BridgeConfig(source_url=url)).run()
    assert "notify-keyspace-events KAE" in str(exc_info.value)
    assert "s3cret-pw" not in str(exc_info.value)


async def test_bridge_assume_notifications_never_touches_config(redis_factory: Factory) -> None:
    server = redis_factory("--rename-command", "CONFIG", "", "--notify-keyspace-events", "KA")
    async with running(config(server, assume_notifications=True)), client(server.url()) as r:
        await r.set("k", "v")
        await wait_changes(r, has((b"k", "set")))


# -- events ---------------------------------------------------------------------------------


async def test_bridge_turns_every_kind_of_event_into_an_entry(redis_server: RedisServer) -> None:
    binary = b"bin\x00\xff\r\n key"
    long_key = b"L" * 5000
    async with running(config(redis_server, db=2)), client(redis_server.url(2)) as r:
        await r.set("s", "v")
        await r.hset("h", "f", "v")
        await r.lpush("l", "x")
        await r.sadd("set", "x")
        await r.zadd("z", {"x": 1})
        await r.xadd("x", {"f": "v"})
        await r.delete("s")
        await r.set("p", "v", ex=100)
        await r.persist("p")
        await r.rename("l", "l2")
        await r.set(binary, "v")
        await r.set(long_key, "v")
        await r.pexpire("h", 20)
        expected = [
            (b"s", "set"),
            (b"h", "hset"),
            (b"l", "lpush"),
            (b"set", "sadd"),
            (b"z", "zadd"),
            (b"x", "xadd"),
            (b"s", "del"),
            (b"p", "expire"),
            (b"p", "persist"),
            (b"l", "rename_from"),
            (b"l2", "rename_to"),
            (binary, "set"),
            (long_key, "set"),
            (b"h", "expire"),
            (b"h", "expired"),
        ]
        got = await wait_changes(r, has(*expected))
    assert {c.db for c in got} == {2}
    assert all(c.time_ms > 0 for c in got)


async def test_bridge_ignores_own_keys(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.set("rrb:lease:0:abc", "token")
    with capture_logs() as logs:
        async with running(config(redis_server)), client(redis_server.url()) as r:
            await r.set("rrb:done:0:abc", "1-0")
            await r.set("after", "v")
            got = await wait_changes(r, has((b"after", "set")))
            await wait_log(logs, event="bridge.rescan_done")
    assert not [c for c in got if c.key.startswith(b"rrb:")]
    (done,) = [e for e in logs if e["event"] == "bridge.rescan_done"]
    assert done["skipped_own"] >= 2  # the lease and the stream itself


async def test_bridge_source_does_not_send_it_events_of_own_keys(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwarded: list[bytes] = []
    real = Bridge._forward

    async def forward(self: Bridge, send: Any, channel: bytes, event: bytes) -> None:
        forwarded.append(channel)
        await real(self, send, channel, event)

    monkeypatch.setattr(Bridge, "_forward", forward)
    async with running(config(redis_server)), client(redis_server.url()) as r:
        for key in ("rrb:lease:0:ab", "rrb:done:0:ab", "rrb", "rr", ""):
            await r.set(key, "v")
        await wait_changes(r, has((b"rrb", "set"), (b"rr", "set"), (b"", "set")))
    assert not [c for c in forwarded if c.startswith(b"__keyspace@0__:rrb:")]


async def test_bridge_acl_allowing_only_the_plain_pattern_still_gets_every_event(
    redis_server: RedisServer,
) -> None:
    with redis_server.client() as c:
        c.config_set("notify-keyspace-events", "KA")
        c.acl_setuser(
            "backup",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["__keyspace@0__:*"],
            commands=["+@all"],
        )
    url = f"redis://backup:pw@127.0.0.1:{redis_server.port}/0"
    with capture_logs() as logs:
        async with running(BridgeConfig(source_url=url).validate()), client(url) as r:
            await r.set("rrb:lease:0:ab", "v")
            await r.set("k", "v")
            got = await wait_changes(r, has((b"k", "set")))
    assert not [c for c in got if c.key.startswith(b"rrb:")]
    assert [e["channel"] for e in logs if e["event"] == "bridge.own_events_unfiltered"] == [
        "__keyspace@0__:*"
    ]


async def test_bridge_pattern_is_filtered_by_the_server(redis_server: RedisServer) -> None:
    with capture_logs() as logs:
        async with running(config(redis_server, pattern="keep:*")), client(redis_server.url()) as r:
            await r.set("drop:1", "v")
            await r.set("keep:1", "v")
            got = await wait_changes(r, has((b"keep:1", "set")))
    assert [c.key for c in got] == [b"keep:1"]
    subscribed = [e for e in logs if e["event"] == "bridge.subscribed"]
    assert subscribed[0]["channel"] == "__keyspace@0__:keep:*"


async def test_bridge_all_dbs_captures_every_db(redis_server: RedisServer) -> None:
    with redis_server.client(5) as c:
        c.set("before", "v")
    async with running(config(redis_server, all_dbs=True)), client(redis_server.url()) as r:
        async with client(redis_server.url(3)) as r3:
            await r3.set("k3", "v")
        got = await wait_changes(r, has((b"k3", "set"), (b"before", "scan")))
    by_key = {c.key: c.db for c in got}
    assert by_key[b"k3"] == 3
    assert by_key[b"before"] == 5


async def test_bridge_stream_on_a_separate_redis(redis_factory: Factory) -> None:
    source, stream = redis_factory(), redis_factory()
    cfg = config(source, stream_url=stream.url())
    async with running(cfg), client(stream.url()) as rs:
        async with client(source.url()) as r:
            await r.set("k", "v")
            await wait_changes(rs, has((b"k", "set")))
            assert not await r.exists(STREAM)
        groups = await rs.xinfo_groups(STREAM)
    assert [g["name"] for g in groups] == [b"rrb-upload"]


# -- gaps -----------------------------------------------------------------------------------


async def test_bridge_startup_rescan_enqueues_existing_keys(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.mset({f"old:{i}": i for i in range(50)})
    with capture_logs() as logs:
        async with running(config(redis_server, scan_count=7)), client(redis_server.url()) as r:
            await wait_log(logs, event="bridge.rescan_done")
            got = await changes(r)
    assert {c.key for c in got if c.event == "scan"} == {b"old:%d" % i for i in range(50)}
    (gap,) = [e for e in logs if e["event"] == "bridge.gap_detected"]
    assert gap["reason"] == "startup"
    (done,) = [e for e in logs if e["event"] == "bridge.rescan_done"]
    assert done["reasons"] == ["startup"] and done["keys"] == 50 and done["seconds"] >= 0


async def test_bridge_rescans_send_indexed_keys_that_are_gone(redis_server: RedisServer) -> None:
    index = OwnKeys().index(0)
    with redis_server.client() as c:
        c.set("live", "v")
        c.hset(index, mapping={"live": "d", "gone": "d", "rrb:own": "d"})
    with capture_logs() as logs:
        async with running(config(redis_server)), client(redis_server.url()) as r:
            await wait_log(logs, event="bridge.rescan_done")
            got = await wait_changes(r, has((b"live", "scan"), (b"gone", "scan")))
            await r.hset(index, "gone-later", "d")
            assert await r.client_kill_filter(_type="pubsub") == 1
            await wait_log(logs, event="bridge.rescan_done", reasons=["reconnect"])
            after = "(" + got[-1].id
            await wait_changes(r, has((b"gone-later", "scan"), (b"live", "scan")), after=after)
    assert {(c.key, c.event) for c in got} == {(b"live", "scan"), (b"gone", "scan")}
    first, again = [e for e in logs if e["event"] == "bridge.rescan_done"]
    assert (first["keys"], first["gone"]) == (1, 1)
    assert (again["keys"], again["gone"]) == (1, 2)


async def test_bridge_pubsub_reconnect_is_a_gap(redis_server: RedisServer) -> None:
    with capture_logs() as logs:
        async with running(config(redis_server)), client(redis_server.url()) as r:
            await wait_log(logs, event="bridge.rescan_done")
            assert await r.client_kill_filter(_type="pubsub") == 1
            await r.set("missed", "v")  # may be published while nobody listens
            await wait_log(logs, event="bridge.gap_detected", reason="reconnect")
            await wait_log(logs, event="bridge.rescan_done", reasons=["reconnect"])
            await r.set("after", "v")
            await wait_changes(r, has((b"after", "set"), (b"missed", "scan")))


async def test_bridge_gap_during_rescan_starts_over(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.mset({f"k{i}": i for i in range(40)})
    cfg = config(redis_server, scan_count=1, scan_pause=0.03)
    with capture_logs() as logs:
        async with running(cfg), client(redis_server.url()) as r:
            await anyio.sleep(0.2)
            await r.client_kill_filter(_type="pubsub")
            await wait_log(logs, event="bridge.rescan_done")
    assert [e for e in logs if e["event"] == "bridge.rescan_restarted"]
    (done,) = [e for e in logs if e["event"] == "bridge.rescan_done"]
    assert done["reasons"] == ["startup", "reconnect"]
    assert done["keys"] >= 40  # SCAN may repeat a key while the table rehashes


async def test_bridge_source_restart_rescans(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.set("kept", "v")
    with capture_logs() as logs:
        async with running(config(redis_server)):
            async with client(redis_server.url()) as r:
                await wait_log(logs, event="bridge.rescan_done")
                await r.set("saved", "v")
                await r.save()
                before = await last_id(r)
            await anyio.to_thread.run_sync(redis_server.restart)
            await wait_log(logs, event="bridge.gap_detected", reason="source_restart")
            async with client(redis_server.url()) as r:
                # The source restarts with notifications off, until the bridge resubscribes.
                async def notifying() -> bool:
                    flags = await r.config_get("notify-keyspace-events")
                    return "K" in flags["notify-keyspace-events"]

                await until(notifying, within=10, interval=0.05)
                await r.set("fresh", "v")
                await wait_changes(
                    r, has((b"kept", "scan"), (b"saved", "scan"), (b"fresh", "set")), after=before
                )


async def test_bridge_stream_redis_outage_and_restart(redis_factory: Factory) -> None:
    source, stream = redis_factory(), redis_factory()
    with capture_logs() as logs:
        async with running(config(source, stream_url=stream.url())), client(source.url()) as r:
            await wait_log(logs, event="bridge.rescan_done")
            await anyio.to_thread.run_sync(stream.stop)
            for i in range(20):
                await r.set(f"during:{i}", "v")
            await wait_log(logs, event="bridge.retry", stage="write")
            await anyio.to_thread.run_sync(stream.start)  # empty: no persistence
            await wait_log(logs, event="bridge.gap_detected", reason="stream_restart")
            async with client(stream.url()) as rs:
                await wait_changes(
                    rs, lambda got: {b"during:%d" % i for i in range(20)} <= {c.key for c in got}
                )

                async def grouped() -> bool:
                    return bool(await rs.xinfo_groups(STREAM))

                await until(grouped, within=10, interval=0.05)
    assert ("bridge.recovered", "write") in {(e["event"], e.get("stage")) for e in logs}


# -- lifecycle ------------------------------------------------------------------------------


async def test_bridge_stop_returns_promptly(redis_server: RedisServer) -> None:
    bridge = Bridge(config(redis_server))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(bridge.run)
            await anyio.sleep(0.3)
            asked = anyio.current_time()
            bridge.stop()
    assert anyio.current_time() - asked < 1


async def test_bridge_stop_before_run_returns(redis_server: RedisServer) -> None:
    bridge = Bridge(config(redis_server))
    bridge.stop()
    with anyio.fail_after(5):
        await bridge.run()


@pytest.mark.parametrize("which", ["source", "stream"])
async def test_bridge_unreachable_redis_is_a_dependency_error(
    redis_server: RedisServer, which: str
) -> None:
    dead = f"redis://:pw-hidden@127.0.0.1:{free_port()}/0"
    if which == "source":
        cfg = BridgeConfig(source_url=dead)
    else:
        cfg = BridgeConfig(source_url=redis_server.url(), stream_url=dead)
    with anyio.fail_after(10), pytest.raises(DependencyError) as exc_info:
        await Bridge(cfg).run()
    assert f"{which} Redis" in str(exc_info.value)
    assert "pw-hidden" not in str(exc_info.value)


# -- the command, as a process ---------------------------------------------------------------


def bridge_command(server: RedisServer, log: Path) -> Command:
    return Command("rrb-bridge", server.url(), log=log, LOG_LEVEL="INFO")


def wait_text(bridge: Command, text: str, count: int = 1, timeout: float = 15) -> None:
    try:
        wait_for(lambda: bridge.output().count(text) >= count, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"no {text!r} in:\n{bridge.output()}")


def test_bridge_killed_9_loses_nothing(
    redis_server: RedisServer, commands: list[Command], tmp_path: Path
) -> None:
    bridge = bridge_command(redis_server, tmp_path / "bridge.log")
    with redis_server.client() as c:
        commands.append(bridge.start())
        wait_text(bridge, "bridge.rescan_done")
        c.set("live", "v")
        wait_for(lambda: c.xlen(STREAM) >= 1)
        bridge.kill9()
        ((last, _),) = c.xrevrange(STREAM, count=1)
        c.set("changed:1", "v")
        c.hset("changed:2", "f", "v")
        c.lpush("changed:3", "x")
        commands.append(bridge.start())
        wait_text(bridge, "bridge.rescan_done", count=2)
        assert bridge.terminate(15) == 0
        new = {fields[b"key"] for _, fields in c.xrange(STREAM, min=b"(" + last)}
    assert {b"changed:1", b"changed:2", b"changed:3"} <= new


def test_bridge_sigterm_exits_0(
    redis_server: RedisServer, commands: list[Command], tmp_path: Path
) -> None:
    bridge = bridge_command(redis_server, tmp_path / "bridge.log")
    commands.append(bridge.start())
    wait_text(bridge, "bridge.subscribed")
    assert bridge.terminate(15) == 0, bridge.output()
    assert "Traceback" not in bridge.output()
