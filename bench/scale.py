"""Uploader scaling: keys/s of 1, 2 and 4 ``rrb-upload`` processes writing to a folder.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.scale                       # 50k keys, median of 3 runs
    .venv/bin/python -m bench.scale --keys 5000 --runs 1 --procs 1,2 --py-spy

Each run starts a fresh ``redis-server`` holding N string keys (64-byte values) and a change
stream with one ``set`` entry per key, written with XADD in the bridge's format
(:func:`rrb_streams.wire.entries.entry_fields`): the bridge is not part of the measurement. The k
uploaders start with the group at the stream's end, and once all k have joined they are
released at once (``XGROUP SETID … 0``, then one more entry that wakes their blocked reads).
Time runs from the release until every entry was delivered and acknowledged, so process start
is not counted. Every key's object must then be in the folder.

The baseline, measured in the same run, is one Python loop doing the same I/O with nothing
around it: SCAN, pipelined DUMP + PTTL, one file written per key (temporary name, then
rename), and one ``syncfs`` at the end. Each figure's ``ratio`` is its keys/s over the
baseline's.

To find the bottleneck, each run also reports CPU over the timed window: every uploader's and
the redis-server's ``utime + stime`` from ``/proc/<pid>/stat``, in % of one core (and the
uploaders' ``stime`` alone), and the machine's busy and iowait shares of all its cores from
``/proc/stat``. ``--py-spy`` samples
the first uploader (``py-spy record``, idle threads left out) and prints its hottest functions.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.backup import count_backups, raw_backup
from bench.common import median, spawn, terminate
from bench.common import redis as start_redis
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.keys import DEFAULT_GROUP, OwnKeys
from tests.support.wait import wait_for

OWN = OwnKeys()
VALUE = b"v" * 64
TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).parent / "py-spy"


def fill(c: redis.Redis, n: int) -> None:
    """``n`` keys, and one change-stream entry per key, as the bridge writes them."""
    now_ms = int(time.time() * 1000)
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        key = b"k:%08d" % i
        pipe.set(key, VALUE)
        pipe.xadd(OWN.stream, entry_fields(0, key, "set", now_ms))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process and its threads, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def machine_ticks() -> tuple[int, int, int]:
    """(busy, iowait, total) clock ticks of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, iowait = values[:5]
    rest = sum(values[5:8])  # irq, softirq, steal
    return user + nice + system + rest, iowait, sum(values[:8])


def syncfs(folder: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


def bench_raw(work: Path, n: int) -> float:
    """The baseline's keys/s."""
    server = start_redis(work / "raw-redis")
    try:
        with server.client() as c:
            fill(c, n)
            os.sync()  # start with no dirty pages of the fill or of anyone's earlier files
            out = work / "raw"
            t0 = time.perf_counter()
            raw_backup(c, out)
            syncfs(out)
            return n / (time.perf_counter() - t0)
    finally:
        server.kill()


def _released(c: redis.Redis) -> bool:
    (group,) = c.xinfo_groups(OWN.stream)
    last = c.xinfo_stream(OWN.stream)["last-generated-id"]
    return bool(group["pending"] == 0 and group["last-delivered-id"] == last)


def _profile_summary(raw: Path, top: int = 8) -> dict[str, float]:
    """Share of samples per innermost function, from py-spy's collapsed stacks."""
    leaves: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            leaves[stack.rsplit(";", 1)[-1]] += int(count)
    total = sum(leaves.values()) or 1
    return {name: round(100 * c / total, 1) for name, c in leaves.most_common(top)}


def bench_uploaders(work: Path, n: int, k: int, profile: bool) -> dict[str, Any]:
    """keys/s of ``k`` uploader processes draining ``n`` changes, with CPU shares."""
    server = start_redis(work / f"redis-{k}")
    out = work / f"ours-{k}"
    procs: list[subprocess.Popen[bytes]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        with server.client() as c:
            fill(c, n)
            c.xgroup_create(OWN.stream, DEFAULT_GROUP, id="$")
            os.sync()
            for i in range(k):
                args = ("--storage", str(out), "--consumer", f"up-{i}")
                procs.append(spawn("rrb-upload", server.url(), *args, log=work / f"up{k}.log"))

            def joined() -> bool:
                return len(c.xinfo_consumers(OWN.stream, DEFAULT_GROUP)) == k

            wait_for(joined, 60, 0.02)
            if profile:
                spy = subprocess.Popen(
                    [
                        *(str(PY_SPY), "record", "--pid", str(procs[0].pid), "--format", "raw"),
                        *("--rate", "200", "--output", str(work / f"spy-{k}.txt"), "--nonblocking"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)  # py-spy attaches
            pids = [p.pid for p in procs]
            assert server.proc is not None
            before = [cpu_ticks(p) for p in pids], cpu_ticks(server.proc.pid), machine_ticks()
            t0 = time.perf_counter()
            c.xgroup_setid(OWN.stream, DEFAULT_GROUP, "0")
            c.xadd(OWN.stream, entry_fields(0, b"k:00000000", "set", int(time.time() * 1000)))
            wait_for(lambda: _released(c), 600, 0.01)
            seconds = time.perf_counter() - t0
            after = [cpu_ticks(p) for p in pids], cpu_ticks(server.proc.pid), machine_ticks()
        stored = count_backups(out)
        if stored != n:
            raise AssertionError(f"{stored} objects for {n} keys")
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        for p in procs:
            terminate(p)
        server.kill()

    def share(ticks: int) -> float:
        return round(100 * ticks / TICK / seconds, 1)

    busy = after[2][0] - before[2][0]
    iowait = after[2][1] - before[2][1]
    total = max(1, after[2][2] - before[2][2])
    pairs = list(zip(after[0], before[0], strict=True))
    uploader_cpu = [share(sum(a) - sum(b)) for a, b in pairs]
    result: dict[str, Any] = {
        "keys_per_s": n / seconds,
        "seconds": seconds,
        "uploaders_cpu_pct": sum(uploader_cpu),
        # In the kernel: creating, renaming and syncing files, and the sockets to Redis.
        "uploaders_sys_pct": sum(share(a[1] - b[1]) for a, b in pairs),
        "per_uploader_cpu_pct": median(uploader_cpu),
        "redis_cpu_pct": share(sum(after[1]) - sum(before[1])),
        # Of every core: 100 here is the whole 2-core machine.
        "machine_busy_pct": round(100 * busy / total, 1),
        "machine_iowait_pct": round(100 * iowait / total, 1),
    }
    if profile and (work / f"spy-{k}.txt").exists():
        result["py_spy_top"] = _profile_summary(work / f"spy-{k}.txt")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keys", type=int, default=50_000)
    p.add_argument("--procs", default="1,2,4", help="uploader process counts to measure")
    p.add_argument("--py-spy", action="store_true", help="profile the first uploader")
    args = p.parse_args()
    counts = [int(x) for x in args.procs.split(",")]
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="rrb-bench-scale-"))
        try:
            run: dict[str, Any] = {"raw_keys_per_s": bench_raw(work, args.keys)}
            for k in counts:
                run[str(k)] = bench_uploaders(work, args.keys, k, args.py_spy)
                run[str(k)]["ratio"] = run[str(k)]["keys_per_s"] / run["raw_keys_per_s"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(run)
        print(f"run {i + 1}: {json.dumps(run)}", flush=True)
    summary: dict[str, Any] = {
        "keys": args.keys,
        "cores": os.cpu_count(),
        "raw_keys_per_s": round(median([r["raw_keys_per_s"] for r in runs])),
    }
    for k in counts:
        numeric = [key for key, v in runs[0][str(k)].items() if isinstance(v, int | float)]
        summary[str(k)] = {
            key: round(median([float(r[str(k)][key]) for r in runs]), 2) for key in numeric
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
