"""rrb-restore as real processes: kill -9 half-way then resume, two processes on one run,
and the target going away mid-run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
import redis

from rrb_streams.format import builder, codec, layout, segment
from rrb_streams.storage.fs import FsStorage
from rrb_streams.wire.source import Source
from tests.support.dataset import snapshot
from tests.support.proc import Command
from tests.support.servers import RedisServer
from tests.support.wait import wait_for

Factory = Callable[..., RedisServer]
KEYS = 12_000


def fill(c: redis.Redis, n: int) -> None:
    """Keys of every core type, a tenth of them with a TTL."""
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        k = f"k:{i:06d}"
        kind = i % 5
        if kind == 0:
            pipe.set(k, b"v\x00" * (i % 20))
        elif kind == 1:
            pipe.hset(k, mapping={"a": i, "b": "x"})
        elif kind == 2:
            pipe.rpush(k, *range(i % 7 + 1))
        elif kind == 3:
            pipe.sadd(k, *range(i % 5 + 1))
        else:
            pipe.zadd(k, {"m": i, "n": -i})
        if i % 10 == 0:
            pipe.expire(k, 3600)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


async def back_up(source: RedisServer, folder: Path, layout_name: str = "keys") -> None:
    """Store every key of the source as the uploader would: its latest-state object, or
    segments of 500 records in SCAN order (each spanning the whole key space)."""
    src = Source(source.url())
    storage = FsStorage(folder)
    try:
        await src.check()
        keys = list(source.client().scan_iter(count=1000))
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            records = await src.read(0, chunk, ["0-1"] * len(chunk))
            if layout_name == "segments":
                recs = [replace(r, stamp=i + 1) for r in records if isinstance(r, codec.KeyRecord)]
                name = segment.segment_name("", 0, i + 1, i + 1, segment.new_uid())
                await storage.put(name, builder.encode_segment(recs))
                continue
            for rec in records:
                assert isinstance(rec, codec.KeyRecord)
                await storage.put(layout.latest_name("", 0, rec.key), codec.encode(rec))
        await storage.flush()
    finally:
        await src.close()
        await storage.close()


@pytest.fixture
def backup(redis_factory: Factory, tmp_path: Path) -> tuple[RedisServer, Path]:
    source = redis_factory()
    fill(source.client(), KEYS)
    folder = tmp_path / "store"
    anyio.run(back_up, source, folder)
    return source, folder


@pytest.fixture(params=["keys", "segments"])
def any_backup(
    request: pytest.FixtureRequest, redis_factory: Factory, tmp_path: Path
) -> tuple[RedisServer, Path, tuple[str, ...]]:
    """A backup of either layout, and the options that cut its restore into small units."""
    source = redis_factory()
    fill(source.client(), KEYS)
    folder = tmp_path / "store"
    anyio.run(back_up, source, folder, request.param)
    small = ("--batch-size", "20") if request.param == "keys" else ("--range-bytes", "4000")
    return source, folder, small


def run_hash(target: RedisServer) -> dict[bytes, bytes]:
    c = target.client()
    names = list(c.scan_iter(match="rrb:restore:*:run"))
    assert len(names) == 1, names
    return c.hgetall(names[0])  # type: ignore[return-value]


def restore_cmd(target: RedisServer, folder: Path, log: Path, *extra: str) -> Command:
    return Command(
        "rrb-restore",
        target.url(),
        "--storage",
        str(folder),
        "--json",
        "--claim-idle",
        "1",
        *extra,
        log=log,
    )


def summary(cmd: Command) -> dict:  # type: ignore[type-arg]
    """The --json summary: the last JSON document in the output."""
    text = cmd.output()
    return json.loads(text[text.index('{\n  "run"') :])


def assert_exact(source: RedisServer, target: RedisServer) -> None:
    assert snapshot(target.client()) == snapshot(source.client())
    assert not list(target.client().scan_iter(match="rrb:*")), "run keys left behind"


def test_restore_killed_at_30_percent_resumes_complete_and_exact(
    any_backup: tuple[RedisServer, Path, tuple[str, ...]],
    redis_factory: Factory,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    source, folder, small = any_backup
    target = redis_factory()
    # One slow writer, small units of work: the kill lands mid-run.
    first = restore_cmd(target, folder, tmp_path / "first.log", "-c", "1", *small)
    commands.append(first.start())

    def progressed() -> bool:
        try:
            meta = run_hash(target)
        except AssertionError:
            return False
        return int(meta.get(b"done", 0)) >= 0.3 * KEYS

    wait_for(progressed, timeout=60, interval=0.005)
    first.kill9()
    meta = run_hash(target)
    done_at_kill = int(meta[b"done"])
    restored_at_kill = int(meta.get(b"restored", 0))
    assert done_at_kill < KEYS, "the restore ended before the kill"
    assert 0 < target.client().dbsize() < KEYS + 10

    second = restore_cmd(target, folder, tmp_path / "second.log")
    commands.append(second.start())
    assert second.proc is not None
    assert second.proc.wait(120) == 0, second.output()
    result = summary(second)
    assert result["resumed"] is True
    assert result["run_totals"]["restored"] == KEYS
    assert result["run_totals"]["failed"] == 0
    # Acknowledged batches are not redone: this process restored exactly what was left.
    assert result["this_process"]["restored"] == KEYS - restored_at_kill
    assert_exact(source, target)


def test_two_processes_restore_one_run_together(
    any_backup: tuple[RedisServer, Path, tuple[str, ...]],
    redis_factory: Factory,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    source, folder, small = any_backup
    target = redis_factory()
    procs = [
        restore_cmd(target, folder, tmp_path / f"p{i}.log", "-c", "1", *small) for i in range(2)
    ]
    commands.extend(p.start() for p in procs)
    for p in procs:
        assert p.proc is not None
        assert p.proc.wait(120) == 0, p.output()
    results = [summary(p) for p in procs]
    assert len({r["run"] for r in results}) == 1, "the second process started its own run"
    mine = [r["this_process"]["restored"] for r in results]
    assert all(n > 0 for n in mine), f"one process did nothing: {mine}"
    # Together exactly once each: no batch was taken by both.
    assert sum(mine) == KEYS
    finishers = [r for r in results if "run_totals" in r]
    assert len(finishers) == 1
    assert finishers[0]["run_totals"]["restored"] == KEYS
    assert_exact(source, target)


def test_target_gone_mid_run_retries_then_stops_and_resumes(
    backup: tuple[RedisServer, Path],
    redis_factory: Factory,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    source, folder = backup
    target = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    cmd = restore_cmd(
        target,
        folder,
        tmp_path / "outage.log",
        "-c",
        "1",
        "--batch-size",
        "20",
        "--retry-timeout",
        "3",
    )
    commands.append(cmd.start())
    wait_for(lambda: target.client().dbsize() > KEYS * 0.2, timeout=60, interval=0.005)
    target.stop()
    started = time.monotonic()
    assert cmd.proc is not None
    status = cmd.proc.wait(60)
    waited = time.monotonic() - started
    out = cmd.output()
    assert status == 1, out
    assert "gave up after" in out and "run the same command again to resume" in out
    assert "restore.retry" in out, "no retry was logged before giving up"
    assert waited >= 2.5, f"gave up after {waited:.1f} s, before --retry-timeout"

    target.start()
    again = restore_cmd(target, folder, tmp_path / "again.log")
    commands.append(again.start())
    assert again.proc is not None
    assert again.proc.wait(120) == 0, again.output()
    result = summary(again)
    assert result["resumed"] is True and result["run_totals"]["restored"] == KEYS
    assert_exact(source, target)


def test_sigterm_finishes_batches_in_hand_and_the_run_resumes(
    backup: tuple[RedisServer, Path],
    redis_factory: Factory,
    tmp_path: Path,
    commands: list[Command],
) -> None:
    source, folder = backup
    target = redis_factory()
    first = restore_cmd(target, folder, tmp_path / "first.log", "-c", "2", "--batch-size", "20")
    commands.append(first.start())
    wait_for(lambda: target.client().dbsize() > KEYS * 0.2, timeout=60, interval=0.005)
    assert first.terminate() == 1, first.output()
    stopped = summary(first)
    assert stopped["finished"] is False
    assert "Run the same command again" not in first.output()  # --json prints data only
    meta = run_hash(target)
    done = int(meta[b"done"])
    # Everything taken was written and acknowledged: nothing is pending.
    pending = target.client().xpending(f"rrb:restore:{stopped['run']}", "rrb-restore")
    assert pending["pending"] == 0
    assert done == stopped["this_process"]["restored"]

    second = restore_cmd(target, folder, tmp_path / "second.log")
    commands.append(second.start())
    assert second.proc is not None
    assert second.proc.wait(120) == 0, second.output()
    result = summary(second)
    assert result["this_process"]["restored"] == KEYS - done
    assert_exact(source, target)
