"""Several bridges for one source, under a continuous writer: the leader is killed with -9, or
paused past its lease; a standby takes over within the lease, the paused one is fenced off,
and once the writer stops and the pipeline drains, the backup equals the source.

Each scenario reports its takeover time: from the kill (or SIGSTOP) to the new leader's
``bridge.became_leader`` log line, and to the first change-stream entry written after it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.load import Writer, assert_backup_equals_source
from tests.support.pipeline import wait_drained
from tests.support.proc import Command, log_events
from tests.support.servers import RedisServer
from tests.support.wait import until, wait_for

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
LEASE = 2.0
MARGIN = 1.0  # scheduling on a shared 2-core machine, the standby's jitter, one round trip
LEADER_KEY = "rrb:bridge:leader"
STREAM = "rrb:changes"


class Cluster:
    """``n`` bridges and one uploader as real processes; the stream on its own Redis."""

    def __init__(self, source: RedisServer, stream: RedisServer, logs: Path, n: int) -> None:
        self.source, self.stream, self.folder = source, stream, logs / "backup"
        self.bridges = [
            Command(
                "rrb-bridge",
                source.url(),
                "--stream-url",
                stream.url(),
                "--leader-lease",
                str(LEASE),
                log=logs / f"bridge{i}.log",
                LOG_LEVEL="INFO",
            )
            for i in range(n)
        ]
        self.uploader = Command(
            "rrb-upload",
            source.url(),
            "--stream-url",
            stream.url(),
            "--storage",
            str(self.folder),
            "--claim-idle",
            "1",
            "--lease",
            "2",
            log=logs / "upload.log",
        )

    def start(self, commands: list[Command]) -> None:
        commands += [self.uploader.start(), *(b.start() for b in self.bridges)]
        with self.stream.client() as s:
            wait_for(lambda: s.exists(STREAM) == 1 and s.exists(LEADER_KEY) == 1)
        for b in self.bridges:  # every standby is up and waiting, not still starting
            wait_for(lambda b=b: bool(events(b, "bridge.standby", "bridge.became_leader")))

    def leader(self) -> Command:
        with self.stream.client() as s:
            token = s.get(LEADER_KEY)
        assert token is not None, "no bridge leads"
        _, pid, _ = token.decode().rsplit("-", 2)
        (leader,) = [b for b in self.bridges if b.pid == int(pid)]
        return leader

    def entries_added(self) -> tuple[int, bytes]:
        """How many entries were ever added to the stream, and the last id."""
        with self.stream.client() as s:
            info = s.xinfo_stream(STREAM)
        return int(info["entries-added"]), info["last-generated-id"]

    async def drain(self) -> float:
        started = time.monotonic()
        await wait_drained(self.stream.url(), within=60)
        return round(time.monotonic() - started, 2)


def events(command: Command, *names: str, after: float = 0.0) -> list[dict[str, Any]]:
    """The JSON log lines of ``command`` whose event is one of ``names``, logged after
    ``after`` (Unix seconds), each with ``at``: its timestamp in Unix seconds."""
    found = []
    for entry in log_events(command.output(), *names):
        entry["at"] = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if entry["at"] > after:
            found.append(entry)
    return found


async def wait_event(command: Command, name: str, after: float, within: float) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        nonlocal found
        found = events(command, name, after=after)
        return bool(found)

    await until(logged, within=within)
    return found[0]


async def first_entry_after(cluster: Cluster, after_ms: int, within: float) -> int:
    """Milliseconds (the stream Redis's clock) of the first entry added after ``after_ms``,
    watched closely so that trimming cannot hide it."""
    found: list[Any] = []
    with cluster.stream.client() as s:

        def added() -> bool:
            nonlocal found
            found = s.xrange(STREAM, min=f"{after_ms + 1}-0", count=1)
            return bool(found)

        await until(added, within=within, interval=0.005)
    return int(found[0][0].split(b"-")[0])


async def test_leader_killed_9_a_standby_takes_over_within_the_lease(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(), redis_factory()
    cluster = Cluster(source, stream, tmp_path, 3)
    cluster.start(commands)
    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(1.5)
        leader = cluster.leader()
        leader.kill9()
        killed = time.time()
        # The dead leader's last batch may still be applied within a few ms of the kill.
        first_entry_ms = await first_entry_after(cluster, int(killed * 1000) + 50, LEASE + 10)
        standbys = [b for b in cluster.bridges if b is not leader]
        took: list[dict[str, Any]] = []

        def taken_over() -> bool:
            nonlocal took
            took = [e for b in standbys for e in events(b, "bridge.became_leader")]
            return bool(took)

        await until(taken_over, within=10)
        await anyio.sleep(1.5)
    finally:
        writer.stop()
    drain = await cluster.drain()
    keys = await assert_backup_equals_source(source, target, cluster.folder)
    takeover = round(took[0]["at"] - killed, 3)
    first_entry = round(first_entry_ms / 1000 - killed, 3)
    fault_report(
        injected=f"kill -9 of the leading bridge (1 of 3), --leader-lease {LEASE}",
        takeover_seconds=takeover,
        first_entry_seconds=first_entry,
        changes=writer.changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )
    assert len(took) == 1, took  # exactly one standby took over
    assert took[0]["reason"] == "takeover"
    assert 0 < takeover <= LEASE + MARGIN
    # Entry ids are whole milliseconds of the stream Redis's clock.
    assert takeover - 0.002 <= first_entry <= LEASE + MARGIN + 1
    assert cluster.leader() is not leader
    assert writer.changes > 1000 and keys > 100


async def test_leader_paused_past_its_lease_is_fenced_off_and_steps_down(
    redis_factory: Factory,
    commands: list[Command],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    source, stream, target = redis_factory(), redis_factory(), redis_factory()
    cluster = Cluster(source, stream, tmp_path, 2)
    cluster.start(commands)
    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(1.0)
        old = cluster.leader()
        (new,) = [b for b in cluster.bridges if b is not old]
        os.kill(old.pid, signal.SIGSTOP)
        paused = time.time()
        try:
            took = await wait_event(new, "bridge.became_leader", paused, LEASE + 10)
            await anyio.sleep(1.0)
        finally:
            writer.stop()
        # The new leader forwards the last events, then the stream stays still.
        added = cluster.entries_added()

        def still_for_a_second() -> bool:  # called a second apart
            nonlocal added
            before, added = added, cluster.entries_added()
            return added == before

        await anyio.sleep(1.0)
        await until(still_for_a_second, within=20, interval=1.0)
    finally:
        os.kill(old.pid, signal.SIGCONT)
    resumed = time.time()
    # It resumes holding the events of its whole pause, unread, and a term it thinks it has.
    lost = await wait_event(old, "bridge.leadership_lost", resumed - 0.5, 10)
    await wait_event(old, "bridge.standby", resumed - 0.5, 10)
    await anyio.sleep(1.0)
    written_after_resume = cluster.entries_added()[0] - added[0]
    assert cluster.entries_added() == added, "the fenced-off leader wrote after it resumed"
    assert cluster.leader() is new
    assert lost["leader"] == took["token"]

    second = Writer(source)
    second.start()
    try:
        await anyio.sleep(1.0)
    finally:
        second.stop()
    drain = await cluster.drain()
    keys = await assert_backup_equals_source(source, target, cluster.folder)
    takeover = round(took["at"] - paused, 3)
    fault_report(
        injected=f"SIGSTOP of the leading bridge (1 of 2) for {round(resumed - paused, 1)} s, "
        f"--leader-lease {LEASE}",
        takeover_seconds=takeover,
        fenced_by=lost["found_by"],
        written_after_resume=written_after_resume,
        changes=writer.changes + second.changes,
        keys=keys,
        differences=0,
        drain_seconds=drain,
    )
    assert 0 < takeover <= LEASE + MARGIN
    assert took["reason"] == "takeover"
