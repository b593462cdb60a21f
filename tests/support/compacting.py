"""Helpers for end-to-end compaction tests: the backup as the commands name it, rrb-compact,
rrb-restore and rrb-verify as processes, what storage and the manifest hold, and a writer of
changes of every core type."""

from __future__ import annotations

import functools
import itertools
import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import redis
from anyio.abc import TaskStatus

from rrb_streams.errors import ObjectNotFound
from rrb_streams.format import manifest as mf
from rrb_streams.format.segment import parse_segment_name
from rrb_streams.format.view import list_segments
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.keys import OwnKeys
from tests.support.moto import s3_env
from tests.support.pipeline import drained
from tests.support.proc import Command, run_command
from tests.support.servers import RedisServer
from tests.support.wait import until


@dataclass(frozen=True)
class Backup:
    """Where a test's backup lives, as a command's options and environment name it."""

    spec: StorageSpec

    @property
    def url(self) -> str:
        if self.spec.kind == "fs":
            assert self.spec.path is not None
            return str(self.spec.path)
        return f"s3://{self.spec.bucket}/{self.spec.base}"

    @property
    def env(self) -> dict[str, str]:
        if self.spec.kind == "fs":
            return {}
        assert self.spec.endpoint_url is not None
        return s3_env(self.spec.endpoint_url)

    def run(
        self, name: str, *args: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Command ``name`` with ``--storage`` pointing here, run to its end."""
        return run_command(name, *args, "--storage", self.url, env=self.env, timeout=timeout)

    async def arun(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """:meth:`run` in a worker thread, so an in-process pipeline keeps running."""
        return await anyio.to_thread.run_sync(functools.partial(self.run, name, *args))

    def command(self, name: str, *args: str, log: Path) -> Command:
        """Command ``name`` with ``--storage`` pointing here, not started yet."""
        return Command(name, *args, "--storage", self.url, log=log, **self.env)


def compact_args(
    stream_url: str, *options: str, grace: str = "0", as_json: bool = True
) -> tuple[str, ...]:
    """rrb-compact's arguments with a quick schedule: level 1 and level 2 at every pass."""
    return (
        stream_url,
        *(("--json",) if as_json else ()),
        "--level1-every",
        "0.1",
        "--level2-every",
        "0.1",
        "--compaction-grace",
        grace,
        *options,
    )


def pass_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What rrb-compact --json printed."""
    assert done.stdout.strip(), (done.returncode, done.stderr[-3000:])
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def pass_report_in(output: str) -> dict[str, Any]:
    """What rrb-compact --json printed, from a log holding its stdout and stderr."""
    start = output.rfind('{\n  "manifest"')
    assert start >= 0, output[-3000:]
    end = output.index("\n}", start) + 2
    return json.loads(output[start:end])  # type: ignore[no-any-return]


async def compact(
    backup: Backup, stream_url: str, *options: str, grace: str = "0"
) -> dict[str, Any]:
    """One rrb-compact pass that must succeed; its report."""
    done = await backup.arun("rrb-compact", *compact_args(stream_url, *options, grace=grace))
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    report = pass_report(done)
    assert not report["lost_race"] and not report["damaged"], report
    return report


def restore_summary(output: subprocess.CompletedProcess[str] | str) -> dict[str, Any]:
    """rrb-restore --json's summary: the last JSON document of its output."""
    text = output if isinstance(output, str) else output.stdout
    start = text.rfind('{\n  "run"')
    assert start >= 0, text[-3000:] if isinstance(output, str) else (output, output.stderr)
    return json.loads(text[start:])  # type: ignore[no-any-return]


async def restore_cli(backup: Backup, target: RedisServer, *options: str) -> dict[str, Any]:
    """rrb-restore of the backup into ``target`` (flushed first), which must succeed with
    nothing failed; its summary."""
    with target.client() as t:
        t.flushall()
    done = await backup.arun("rrb-restore", target.url(), "--json", *options)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    summary = restore_summary(done)
    assert summary["run_totals"]["failed"] == 0, summary
    return summary


async def verify_cli(backup: Backup, source: RedisServer) -> dict[str, Any]:
    """rrb-verify of the backup against ``source``; its --json summary."""
    done = await backup.arun("rrb-verify", source.url(), "--json", "--recheck-delay", "0.2")
    assert done.stdout.strip(), (done.returncode, done.stderr[-3000:])
    out: dict[str, Any] = json.loads(done.stdout)
    out["exit"] = done.returncode
    return out


# -- what storage holds ---------------------------------------------------------------------


async def segments(storage: Storage, prefix: str = "") -> dict[str, int]:
    """Every segment object in storage, with its level."""
    out = {}
    async for info in list_segments(storage, prefix):
        parsed = parse_segment_name(info.name, prefix)
        assert parsed is not None
        out[info.name] = parsed.level
    return out


async def manifest(storage: Storage, prefix: str = "") -> mf.Manifest:
    return await mf.read_latest(storage, prefix)


async def unaccounted(storage: Storage, prefix: str = "") -> set[str]:
    """Objects above level 0 that the newest manifest neither names nor retired."""
    m = await manifest(storage, prefix)
    known = m.names | m.retired_names
    return {n for n, level in (await segments(storage, prefix)).items() if level and n not in known}


class ManifestLog:
    """Every manifest version, read as it appears: a version is pruned once eight newer ones
    exist, so :meth:`watch` looks often."""

    def __init__(self, storage: Storage, prefix: str = "") -> None:
        self.storage = storage
        self.prefix = prefix
        self.versions: dict[int, mf.Manifest] = {}

    async def look(self) -> None:
        for seq, name in await mf.manifest_names(self.storage, self.prefix):
            if seq not in self.versions:
                try:
                    self.versions[seq] = mf.decode(await self.storage.get(name), name)
                except ObjectNotFound:
                    continue  # pruned since the listing: a gap the chain check reports

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look every 10 ms until cancelled."""
        task_status.started()
        while True:
            await self.look()
            await anyio.sleep(0.01)

    def chain(self) -> list[str]:
        """Check the versions form one chain, and return their writers in order: versions
        1..n each seen, none naming an object an earlier one retired (a fork would bring one
        back), and each writer's versions in one run (two compactors never interleave)."""
        seqs = sorted(self.versions)
        assert seqs == list(range(1, len(seqs) + 1)), f"versions seen: {seqs}"
        retired: set[str] = set()
        for seq in seqs:
            m = self.versions[seq]
            assert m.seq == seq
            back = m.names & retired
            assert not back, f"version {seq} names objects retired before it: {back}"
            retired |= m.retired_names
        writers = [self.versions[seq].writer for seq in seqs]
        runs = [w for i, w in enumerate(writers) if i == 0 or writers[i - 1] != w]
        assert len(runs) == len(set(runs)), f"writers interleave: {writers}"
        return writers


def _entries(folder: Path) -> list[Path]:
    """What a folder holds; nothing once it is gone (a delete removes emptied folders)."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def fs_segments(folder: Path) -> dict[str, int]:
    """:func:`segments` of a folder, read without an event loop (a watcher's quick look
    while a compactor runs)."""
    out = {}
    for level_dir in _entries(folder / "segments"):
        for path in _entries(level_dir):
            name = f"segments/{level_dir.name}/{path.name}"
            parsed = parse_segment_name(name)
            if parsed is not None:
                out[name] = parsed.level
    return out


def fs_manifest_names(folder: Path) -> list[str]:
    """The manifest versions in a folder, oldest first, read without an event loop."""
    names = (f"manifest/{p.name}" for p in _entries(folder / "manifest"))
    return sorted(n for n in names if mf.is_manifest_name(n))


def fs_manifest_seq(folder: Path) -> int:
    """The newest manifest version in a folder, from the names alone (0: none yet)."""
    names = fs_manifest_names(folder)
    return int(names[-1].removeprefix(mf.MANIFEST_DIR)[:17]) if names else 0


def fs_manifest(folder: Path) -> mf.Manifest:
    """The newest manifest in a folder, read without an event loop."""
    names = fs_manifest_names(folder)
    if not names:
        return mf.Manifest()
    return mf.decode((folder / names[-1]).read_bytes(), names[-1])


# -- changes of every core type ------------------------------------------------------------

_markers = itertools.count()


async def uploaded(c: redis.Redis, within: float = 30.0) -> None:
    """Return once every change made on ``c`` so far is stored: a marker key is set after
    them, and the uploaders have acknowledged everything up to its entry. (The marker keys
    are part of the dataset.)"""
    marker = b"marker:%d" % next(_markers)
    c.set(marker, b"1")
    seen = False

    def done() -> bool:
        nonlocal seen
        if not seen:
            last = c.xrevrange(OwnKeys().stream, count=1)
            seen = bool(last) and last[0][1].get(b"key") == marker
        return seen and drained(c)

    await until(done, within=within, interval=0.005)


KINDS = ("s", "h", "l", "set", "z")


def change(pipe: Any, rng: random.Random, keys: int) -> None:
    """One random change to one of ``keys`` keys per type (the key's name says its type):
    a new value, a deletion, a value with a TTL, or an added element."""
    kind = rng.choice(KINDS)
    key = f"{kind}:{rng.randrange(keys)}"
    op = rng.random()
    value = f"{rng.random():.12f}-" + "x" * rng.randrange(0, 120)
    if op < 0.15:
        pipe.delete(key)
        return
    if kind == "s":
        pipe.set(key, value, ex=3600 if op > 0.8 else None)
        return
    if op < 0.5:
        pipe.delete(key)  # replace the whole value
    if kind == "h":
        pipe.hset(key, mapping={f"f{rng.randrange(8)}": value, "n": rng.randrange(1000)})
    elif kind == "l":
        pipe.rpush(key, value, rng.randrange(1000))
    elif kind == "set":
        pipe.sadd(key, value, rng.randrange(50))
    else:
        pipe.zadd(key, {value: rng.random(), "m": rng.randrange(100)})
    if op > 0.85:
        pipe.expire(key, 3600)


def burst(c: redis.Redis, rng: random.Random, changes: int, keys: int = 300) -> None:
    """``changes`` random changes, pipelined."""
    pipe = c.pipeline(transaction=False)
    for _ in range(changes):
        change(pipe, rng, keys)
    pipe.execute()


class ChangeWriter(threading.Thread):
    """Changes of every core type, continuously, until :meth:`stop`."""

    def __init__(self, server: RedisServer, keys: int = 3000, seed: int = 5) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.keys = keys
        self.seed = seed
        self.halt = threading.Event()
        self.changes = 0

    def run(self) -> None:
        rng = random.Random(self.seed)
        with self.server.client() as c:
            while not self.halt.is_set():
                burst(c, rng, 100, self.keys)
                self.changes += 100
                time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
