"""kill -9 and SIGTERM of real rrb processes: nothing is lost, shutdown is clean."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.support.load import Writer, assert_backup_equals_source
from tests.support.pipeline import drained, wait_drained
from tests.support.proc import Command
from tests.support.servers import RedisServer
from tests.support.wait import wait_for


@pytest.mark.anyio
async def test_bridge_killed_9_changes_made_while_down_still_arrive(
    redis_factory: Callable[..., RedisServer], commands: list[Command], tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    upload = Command(
        "rrb-upload", source.url(), "--storage", str(folder), log=tmp_path / "upload.log"
    )
    bridge = Command("rrb-bridge", source.url(), log=tmp_path / "bridge.log")
    commands += [upload.start(), bridge.start()]
    with source.client() as c:
        wait_for(lambda: c.exists("rrb:changes") == 1)
        c.set("before", "1")
        await wait_drained(source.url())
        bridge.kill9()
        # Changed while no bridge runs: no event is ever delivered for these.
        for i in range(200):
            c.set(f"while-down:{i}", i)
        c.delete("before")
        c.hset("while-down:hash", "f", "v")
    commands.append(bridge.start())
    # The stream is drained before the new bridge's rescan adds anything: wait for the rescan.
    wait_for(lambda: bridge.output().count('"bridge.rescan_done"') == 2)
    await wait_drained(source.url())
    assert await assert_backup_equals_source(source, target, folder) == 201


@pytest.mark.anyio
async def test_one_of_two_uploaders_killed_9_under_load_loses_nothing(
    redis_factory: Callable[..., RedisServer], commands: list[Command], tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    uploaders = [
        Command(
            "rrb-upload",
            source.url(),
            "--storage",
            str(folder),
            "--claim-idle",
            "1",
            "--lease",
            "2",
            "--consumer",
            f"up-{i}",
            log=tmp_path / f"upload{i}.log",
        )
        for i in range(2)
    ]
    bridge = Command("rrb-bridge", source.url(), log=tmp_path / "bridge.log")
    commands += [u.start() for u in uploaders] + [bridge.start()]
    with source.client() as c:
        wait_for(lambda: c.exists("rrb:changes") == 1)
    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(2.0)
        uploaders[0].kill9()
        await anyio.sleep(2.0)
    finally:
        writer.stop()
    await wait_drained(source.url(), within=60)
    assert writer.changes > 1000
    assert await assert_backup_equals_source(source, target, folder) > 100
    with source.client() as c:
        # The dead consumer's entries were claimed: nothing is pending on it.
        consumers = {
            x["name"]: x["pending"] for x in c.xinfo_consumers("rrb:changes", "rrb-upload")
        }
        assert consumers.get(b"up-0", 0) == 0


def test_rrb_exits_0_on_sigterm_after_finishing_its_work(
    redis_factory: Callable[..., RedisServer], commands: list[Command], tmp_path: Path
) -> None:
    source = redis_factory()
    folder = tmp_path / "backup"
    rrb = Command("rrb", source.url(), "--storage", str(folder), log=tmp_path / "rrb.log")
    commands.append(rrb.start())
    with source.client() as c:
        wait_for(lambda: c.exists("rrb:changes") == 1)
        for i in range(100):
            c.set(f"k{i}", i)
        wait_for(lambda: drained(c) and any(folder.rglob("*.seg")))
    started = time.monotonic()
    assert rrb.terminate() == 0, rrb.output()
    assert time.monotonic() - started < 12
    assert "Traceback" not in rrb.output()
