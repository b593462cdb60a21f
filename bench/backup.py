"""Backup benchmarks: bulk backup, sustained capture, end-to-end lag, hot key, memory.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.backup            # every figure, median of 3 runs
    .venv/bin/python -m bench.backup --runs 5 --only bulk,lag

Every figure is a median over ``--runs`` runs, and each ratio is against a baseline measured in
the same run on the same machine. Targets (2 cores):

==================  ====================================================  ===================
bulk                20k existing keys to a folder, vs a raw SCAN + DUMP    at most 3x the raw
                    + PTTL + one file write per key loop                   loop's time
capture             highest SET rate at which every key reaches the        >= 20,000 changes/s
                    stream
lag                 write to object visible at 1,000 changes/s (folder)    p99 <= 1 s
hotkey              PUTs per change, one key written 1,000 times/s         <= 0.1
memory              peak RSS of rrb-bridge and of rrb-upload under load    < 150 MB, flat
==================  ====================================================  ===================
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import median, percentile, rss_mb, spawn, terminate
from bench.common import redis as start_redis
from rrb_streams.format import layout
from rrb_streams.wire.keys import OwnKeys
from tests.support.wait import wait_for

OWN = OwnKeys()
VALUE = b"v" * 64


def count_backups(root: Path) -> int:
    """Objects (``.backup`` files) below ``root``."""
    return sum(
        1 for _, _, files in os.walk(root) for f in files if f.endswith(layout.BACKUP_SUFFIX)
    )


def fill(c: redis.Redis, n: int, prefix: str = "k") -> None:
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:{i:08d}", VALUE)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def raw_backup(c: redis.Redis, root: Path) -> None:
    """The baseline: SCAN, pipelined DUMP + PTTL, one file written per key."""
    root.mkdir(parents=True, exist_ok=True)
    cursor = 0
    while True:
        cursor, keys = c.scan(cursor, count=1000)
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.dump(k)
            pipe.pttl(k)
        res = pipe.execute()
        for i, k in enumerate(keys):
            name = layout.key_hash(k)
            tmp = root / f".{name}.tmp"
            tmp.write_bytes(k + res[2 * i])
            tmp.replace(root / name)
        if cursor == 0:
            return


def bench_bulk(work: Path, n: int = 20_000) -> dict[str, float]:
    server = start_redis(work / "redis")
    try:
        with server.client() as c:
            fill(c, n)
            # syncfs flushes the whole filesystem: start each side with no dirty pages left by
            # the other (or by the previous run), untimed, so neither pays for the other's files.
            os.sync()
            t0 = time.perf_counter()
            raw_backup(c, work / "raw")
            raw = time.perf_counter() - t0
        os.sync()
        out = work / "ours"
        t0 = time.perf_counter()
        proc = spawn("rrb", server.url(), "--storage", str(out), log=work / "rrb.log")
        try:
            wait_for(lambda: out.exists() and count_backups(out) >= n, 300, 0.05)
            ours = time.perf_counter() - t0
        finally:
            terminate(proc)
    finally:
        server.kill()
    return {"raw_s": raw, "ours_s": ours, "ratio": ours / raw}


def _drain_stream_keys(c: redis.Redis, after: str) -> tuple[set[bytes], str, int]:
    """Keys of ``set`` entries after id ``after``; returns (keys, last id, scan entries)."""
    keys: set[bytes] = set()
    scans = 0
    last = after
    while True:
        batch = c.xrange(OWN.stream, min=f"({last}", count=10_000)
        if not batch:
            return keys, last, scans
        for _entry_id, fields in batch:
            if fields[b"ev"] == b"scan":
                scans += 1
            keys.add(fields[b"key"])
        last = batch[-1][0].decode()


def paced_writes(
    c: redis.Redis, rate: int, seconds: float, make: Callable[[int], tuple[bytes, bytes]]
) -> tuple[int, float]:
    """Write ``rate`` changes a second for ``seconds``, in 10 ms pipelined slices.

    Returns (changes written, achieved seconds).
    """
    per_slice = max(1, rate // 100)
    total = int(rate * seconds)
    start = time.perf_counter()
    i = 0
    while i < total:
        pipe = c.pipeline(transaction=False)
        for _ in range(min(per_slice, total - i)):
            key, value = make(i)
            pipe.set(key, value)
            i += 1
        pipe.execute()
        ahead = start + i / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return total, time.perf_counter() - start


def bench_capture(work: Path, rates: list[int], seconds: float = 5.0) -> dict[str, Any]:
    """For each rate: are all keys in the stream as events? Highest lossless rate wins."""
    server = start_redis(work / "redis")
    proc = spawn("rrb-bridge", server.url(), log=work / "bridge.log")
    results: dict[str, Any] = {}
    try:
        with server.client() as c:
            wait_for(lambda: c.exists(OWN.stream) == 1, 30, 0.02)
            time.sleep(0.5)
            last = "0-0"
            best = 0
            for rate in rates:
                _, last, _ = _drain_stream_keys(c, last)
                written, took = paced_writes(
                    c, rate, seconds, lambda i, r=rate: (b"cap:%d:%d" % (r, i), b"x")
                )
                achieved = written / took
                expected = {b"cap:%d:%d" % (rate, i) for i in range(written)}
                seen: set[bytes] = set()
                scans = 0
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not expected <= seen:
                    keys, last, scanned = _drain_stream_keys(c, last)
                    seen |= keys
                    scans += scanned
                    time.sleep(0.2)
                captured = len(expected & seen) / len(expected)
                results[str(rate)] = {
                    "achieved_per_s": round(achieved),
                    "captured": captured,
                    # Entries a gap rescan wrote: the subscription dropped events.
                    "rescan_entries": scans,
                }
                if captured == 1.0 and scans == 0 and achieved >= 0.95 * rate:
                    best = max(best, rate)
            results["best_lossless_per_s"] = best
    finally:
        terminate(proc)
        server.kill()
    return results


def bench_lag(work: Path, rate: int = 1000, seconds: float = 10.0) -> dict[str, float]:
    server = start_redis(work / "redis")
    out = work / "ours"
    proc = spawn("rrb", server.url(), "--storage", str(out), log=work / "rrb.log")
    written_at: dict[bytes, float] = {}
    try:
        with server.client() as c:
            wait_for(lambda: c.exists(OWN.stream) == 1, 30, 0.02)
            time.sleep(1.0)

            def make(i: int) -> tuple[bytes, bytes]:
                key = b"lag:%d" % i
                written_at[key] = time.time()
                return key, VALUE

            total, _ = paced_writes(c, rate, seconds, make)
            wait_for(lambda: count_backups(out) >= total, 60, 0.1)
        lags = [
            os.stat(out / layout.latest_name("", 0, key)).st_mtime - t
            for key, t in written_at.items()
        ]
    finally:
        terminate(proc)
        server.kill()
    return {"p50_s": percentile(lags, 0.5), "p99_s": percentile(lags, 0.99), "max_s": max(lags)}


def bench_hotkey(work: Path, rate: int = 1000, seconds: float = 10.0) -> dict[str, float]:
    server = start_redis(work / "redis")
    out = work / "ours"
    proc = spawn("rrb", server.url(), "--storage", str(out), "--versioning", log=work / "rrb.log")
    try:
        with server.client() as c:
            wait_for(lambda: c.exists(OWN.stream) == 1, 30, 0.02)
            time.sleep(1.0)
            total, _ = paced_writes(c, rate, seconds, lambda i: (b"hot", b"%d" % i))

            def drained() -> bool:
                groups = c.xinfo_groups(OWN.stream)
                return bool(groups) and all(g["pending"] == 0 and g["lag"] == 0 for g in groups)

            wait_for(drained, 60, 0.1)
        versions = out / layout.versions_prefix("", 0, b"hot")
        puts = len([f for f in versions.iterdir() if f.name.endswith(layout.BACKUP_SUFFIX)])
    finally:
        terminate(proc)
        server.kill()
    return {"changes": total, "puts": puts, "puts_per_change": puts / total}


def bench_memory(work: Path, rate: int = 5000, seconds: float = 60.0) -> dict[str, float]:
    server = start_redis(work / "redis")
    out = work / "ours"
    bridge = spawn("rrb-bridge", server.url(), log=work / "bridge.log")
    upload = spawn("rrb-upload", server.url(), "--storage", str(out), log=work / "upload.log")
    samples: dict[str, list[float]] = {"bridge": [], "upload": []}
    try:
        with server.client() as c:
            wait_for(lambda: c.exists(OWN.stream) == 1, 30, 0.02)
            per_second = rate
            start = time.perf_counter()
            n = 0
            while time.perf_counter() - start < seconds:
                written, _ = paced_writes(
                    c,
                    per_second,
                    1.0,
                    lambda i, base=n: (b"mem:%d" % ((base + i) % 100_000), VALUE),
                )
                n += written
                samples["bridge"].append(rss_mb(bridge.pid)[0])
                samples["upload"].append(rss_mb(upload.pid)[0])
            # Entries not yet handed to the uploader when the load stopped: memory must stay
            # flat whether or not the uploader kept up.
            backlog = sum(int(g["lag"] or 0) for g in c.xinfo_groups(OWN.stream))
        peaks = {"bridge": rss_mb(bridge.pid)[1], "upload": rss_mb(upload.pid)[1]}
    finally:
        terminate(bridge)
        terminate(upload)
        server.kill()
    tenth = max(1, len(samples["bridge"]) // 10)
    return {
        "bridge_peak_mb": peaks["bridge"],
        "upload_peak_mb": peaks["upload"],
        "bridge_early_mb": median(samples["bridge"][tenth : 2 * tenth]),
        "bridge_late_mb": median(samples["bridge"][-tenth:]),
        "upload_early_mb": median(samples["upload"][tenth : 2 * tenth]),
        "upload_late_mb": median(samples["upload"][-tenth:]),
        "changes": n,
        "backlog_at_end": backlog,
    }


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: median([float(r[k]) for r in runs]) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="bulk,capture,lag,hotkey,memory")
    p.add_argument("--rates", default="10000,20000,30000,40000")
    p.add_argument("--memory-seconds", type=float, default=60.0)
    args = p.parse_args()
    only = set(args.only.split(","))
    report: dict[str, Any] = {}
    benches: dict[str, Callable[[Path], dict[str, Any]]] = {
        "bulk": bench_bulk,
        "capture": lambda w: bench_capture(w, [int(r) for r in args.rates.split(",")]),
        "lag": bench_lag,
        "hotkey": bench_hotkey,
        "memory": lambda w: bench_memory(w, seconds=args.memory_seconds),
    }
    for name, fn in benches.items():
        if name not in only:
            continue
        runs = []
        for i in range(args.runs if name != "memory" else 1):
            work = Path(tempfile.mkdtemp(prefix=f"rrb-bench-{name}-"))
            try:
                runs.append(fn(work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"{name} run {i + 1}: {json.dumps(runs[-1])}", flush=True)
        report[name] = {"median": _median_of(runs), "runs": runs}
        print(f"{name} median: {json.dumps(report[name]['median'])}", flush=True)
    print(json.dumps({k: v["median"] for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
