"""Fault scenarios under a continuous writer: every process and Redis the pipeline depends on
fails, and once the writer stops and the pipeline drains, the backup equals the source.

The change stream lives on its own Redis (AOF, fsync always), as the README recommends.
Each scenario reports what it injected, the differences found and the drain time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from rrb_streams.crypt import age
from rrb_streams.storage.encrypted import AgeStorage
from tests.support.age import AGE_KEYS, ALICE
from tests.support.dataset import difference, restore_latest, snapshot
from tests.support.load import Writer, assert_backup_equals_source
from tests.support.moto import moto_storage, s3_env
from tests.support.pipeline import wait_drained
from tests.support.proc import Command
from tests.support.proxy import Proxy
from tests.support.servers import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


class Pipeline:
    """A bridge and two uploaders as real processes, the stream on its own Redis."""

    def __init__(
        self,
        source: RedisServer,
        stream: RedisServer,
        folder: Path,
        logs: Path,
        *,
        storage: str | None = None,
        env: dict[str, str] | None = None,
        lease: float = 2.0,
    ):
        self.source, self.stream, self.folder = source, stream, folder
        self.bridge = Command(
            "rrb-bridge", source.url(), "--stream-url", stream.url(), log=logs / "bridge.log"
        )
        self.uploaders = [
            Command(
                "rrb-upload",
                source.url(),
                "--stream-url",
                stream.url(),
                "--storage",
                storage or str(folder),
                "--claim-idle",
                "1",
                "--lease",
                str(lease),
                "--consumer",
                f"up-{i}",
                log=logs / f"upload{i}.log",
                **(env or {}),
            )
            for i in range(2)
        ]

    @property
    def processes(self) -> list[Command]:
        return [self.bridge, *self.uploaders]

    def start(self, commands: list[Command]) -> None:
        commands += [p.start() for p in self.processes]
        with self.stream.client() as s:
            wait_for(lambda: s.exists("rrb:changes") == 1)

    def wait_uploaders_joined(self) -> None:
        """Until every uploader has read from the group: past its start-up checks."""
        with self.stream.client() as s:

            def joined() -> bool:
                consumers = s.xinfo_consumers("rrb:changes", "rrb-upload")
                return len(consumers) == len(self.uploaders)

            wait_for(joined, timeout=30)

    async def drain(self) -> float:
        """Seconds from now until every change is uploaded."""
        started = time.monotonic()
        try:
            await wait_drained(self.stream.url(), within=90)
        except TimeoutError as exc:
            with self.stream.client() as c:
                state = c.xinfo_groups("rrb:changes")
            raise AssertionError(f"the pipeline did not drain in 90 s: {state}") from exc
        return round(time.monotonic() - started, 2)


async def settle(pipeline: Pipeline, target: RedisServer) -> tuple[int, float]:
    """Drain, then compare the backup with the source: (keys compared, drain seconds)."""
    drain = await pipeline.drain()
    keys = await assert_backup_equals_source(pipeline.source, target, pipeline.folder)
    return keys, drain


async def test_random_kill_9_of_bridge_and_uploaders(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    pipeline.start(commands)
    rng = random.Random(11)
    writer = Writer(source)
    writer.start()
    kills: dict[str, int] = {}
    bridge, first, second = pipeline.processes
    victims = [bridge, bridge, bridge, first, first, second, second, second]
    rng.shuffle(victims)
    try:
        for victim in victims:
            await anyio.sleep(rng.uniform(0.3, 0.8))
            victim.kill9()
            kills[victim.name] = kills.get(victim.name, 0) + 1
            await anyio.sleep(rng.uniform(0.1, 0.5))
            commands.append(victim.start())
    finally:
        writer.stop()
    keys, drain = await settle(pipeline, target)
    assert kills == {"rrb-bridge": 3, "rrb-upload": 5}
    fault_report(
        injected=f"{sum(kills.values())} kill -9 ({kills})",
        changes=writer.changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )


async def test_the_streams_redis_killed_9_and_restarted_mid_load(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    pipeline.start(commands)
    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(1.5)
        stream.kill()
        await anyio.sleep(1.0)  # the bridge and uploaders retry meanwhile
        stream.start()  # the same port and folder: its AOF is reloaded
        await anyio.sleep(1.5)
    finally:
        writer.stop()
    keys, drain = await settle(pipeline, target)
    assert all(p.proc is not None and p.proc.poll() is None for p in pipeline.processes)
    fault_report(
        injected="kill -9 of the stream's Redis, restarted after 1 s",
        changes=writer.changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )


async def test_the_source_restarted_with_its_data(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(*DURABLE), redis_factory(*DURABLE), redis_factory()
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    pipeline.start(commands)
    changes = 0
    for _ in range(2):
        writer = Writer(source)
        writer.start()
        await anyio.sleep(1.5)
        writer.stop()
        changes += writer.changes
        before = source.client().info("server")["run_id"]
        source.stop()  # graceful: the AOF keeps the data
        source.start()
        assert source.client().info("server")["run_id"] != before
    writer = Writer(source)
    writer.start()
    await anyio.sleep(1.0)
    writer.stop()
    changes += writer.changes
    keys, drain = await settle(pipeline, target)
    bridge_log = pipeline.bridge.output()
    assert "source_restart" in bridge_log
    fault_report(
        injected="2 restarts of the source (new run_id, data kept)",
        changes=changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )


async def test_a_subscriber_dropped_by_the_output_buffer_limit_is_healed(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    pipeline.start(commands)
    c = source.client()
    # A tiny pubsub buffer: a flood of events outruns the bridge, and Redis drops it.
    c.config_set("client-output-buffer-limit", "pubsub 8kb 4kb 1")
    log = source.dir / "redis.log"

    def dropped() -> int:
        return log.read_text(errors="replace").count("for overcoming of output buffer limits")

    writer = Writer(source)
    writer.start()
    flooded = 0
    try:
        for burst in range(20):
            pipe = c.pipeline(transaction=False)
            for i in range(5_000):
                pipe.set(f"flood:{burst}:{i}:" + "x" * 100, i)
            pipe.execute()
            flooded += 5_000
            if dropped():
                break
    finally:
        writer.stop()
    disconnections = dropped()
    keys, drain = await settle(pipeline, target)
    assert disconnections >= 1, "the flood never overflowed the subscriber's buffer"
    assert "reconnect" in pipeline.bridge.output()
    fault_report(
        injected=f"{disconnections} subscriber disconnections (client-output-buffer-limit)",
        changes=writer.changes + flooded,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )


async def test_a_poison_key_is_dead_lettered_and_blocks_nothing(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    # The uploaders' user may not read poison:*: its DUMP fails every time.
    source.client().execute_command(
        "ACL", "SETUSER", "uploader", "on", ">up-pw", "~w:*", "~ok:*", "+@all"
    )
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    up_url = f"redis://uploader:up-pw@127.0.0.1:{source.port}/0"
    for u in pipeline.uploaders:
        u.args = (up_url, *u.args[1:], "--max-attempts", "3")
    pipeline.start(commands)
    writer = Writer(source)
    writer.start()
    c = source.client()
    try:
        await anyio.sleep(0.5)
        c.set("poison:1", "unreadable")
        for i in range(200):
            c.set(f"ok:{i}", i)
        await anyio.sleep(1.0)
    finally:
        writer.stop()
    drain = await pipeline.drain()
    with stream.client() as s:
        letters = s.xrange("rrb:dead")
    assert [f[b"key"] for _, f in letters] == [b"poison:1"]
    reason = letters[0][1][b"reason"].decode()
    assert "NOPERM" in reason or "permission" in reason, reason
    status = Command("rrb-status", stream.url(), "--json", log=tmp_path / "status.log")
    status.start()
    assert status.proc is not None and status.proc.wait(20) == 0
    assert '"dead_letters": 1' in status.output()
    c.delete("poison:1")  # everything else must be exact
    keys = await assert_backup_equals_source(source, target, pipeline.folder)
    fault_report(
        injected="1 key whose DUMP the uploaders' ACL user may not run",
        changes=writer.changes + 201,
        keys=keys,
        dead_letters=len(letters),
        differences=0,
        drain_seconds=drain,
    )


async def test_flushall_and_swapdb_under_a_writer_converge(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    pipeline = Pipeline(source, stream, tmp_path / "backup", tmp_path)
    pipeline.start(commands)
    c = source.client()
    for i in range(300):
        source.client(1).set(f"db1:{i}", i)
    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(1.0)
        c.swapdb(0, 1)
        await anyio.sleep(1.0)
        c.flushall()
        await anyio.sleep(1.0)
        c.swapdb(0, 1)  # db 0 gets the (empty) db 1; the writer refills it
        await anyio.sleep(1.0)
    finally:
        writer.stop()
    keys, drain = await settle(pipeline, target)
    assert "source_wipe" in pipeline.bridge.output()
    fault_report(
        injected="SWAPDB, FLUSHALL, SWAPDB under the writer",
        changes=writer.changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )


# Encrypted, the outage is shorter: what is under test is that the retried writes are
# encrypted and whole, which a few seconds show as well as twenty.
@pytest.mark.parametrize(("encrypted", "cut"), [(False, 20), (True, 8)], ids=["plain", "age"])
async def test_storage_unreachable_for_seconds(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    fault_report: Callable[..., None],
    encrypted: bool,
    cut: int,
) -> None:
    source, stream, target = redis_factory(), redis_factory(*DURABLE), redis_factory()
    proxy = Proxy(int(moto_endpoint.rsplit(":", 1)[1]))
    pipeline = Pipeline(
        source,
        stream,
        tmp_path / "unused",
        tmp_path,
        storage=f"s3://{s3_bucket}/",
        env={
            **s3_env(f"http://127.0.0.1:{proxy.port}"),
            **({"RRB_AGE_RECIPIENTS": str(ALICE.recipient)} if encrypted else {}),
        },
    )
    raw = moto_storage(s3_bucket, moto_endpoint)
    direct = AgeStorage(raw, AGE_KEYS)  # reads plain and encrypted objects alike
    try:
        pipeline.start(commands)
        # The uploaders check storage at start: cut it only once they are past that.
        pipeline.wait_uploaders_joined()
        writer = Writer(source)
        writer.start()
        s = stream.client()

        def backlog() -> int:
            group = s.xinfo_groups("rrb:changes")[0]
            return int(group["pending"]) + int(group["lag"] or 0)

        try:
            await anyio.sleep(1.0)
            proxy.down()
            await anyio.sleep(2.0)  # requests in flight when the link died fail by now
            stored_before = len([i async for i in direct.list()])
            backlog_before = backlog()
            await anyio.sleep(cut - 2.0)
            backlog_after = backlog()
            stored_after = len([i async for i in direct.list()])
            proxy.up()
            await anyio.sleep(1.0)
        finally:
            writer.stop()
        # Nothing reached storage while it was cut off, and the backlog only grew.
        assert stored_after == stored_before
        assert backlog_after > backlog_before
        drain = await pipeline.drain()
        with target.client() as t, source.client() as c:
            await restore_latest(direct, t)
            expected = snapshot(c)
            found = difference(expected, snapshot(t))
            assert not found, f"{found}; dead letters: {s.xrange('rrb:dead', count=5)}"
            keys = len(expected)
        assert s.xlen("rrb:dead") == 0
        stored = [await raw.get(i.name) async for i in raw.list()]
        assert stored and all(age.is_encrypted(d) is encrypted for d in stored)
        assert "upload.retry" in pipeline.uploaders[0].output() + pipeline.uploaders[1].output()
    finally:
        proxy.close()
        await direct.close()
    fault_report(
        injected=f"storage cut off for {cut} s ({proxy.refused} connections refused)",
        changes=writer.changes,
        keys=keys,
        backlog_growth=backlog_after - backlog_before,
        differences=0,
        drain_seconds=drain,
    )
