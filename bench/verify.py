"""``rrb-verify`` on a large backup: time and peak memory.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.verify                       # a million keys, 3 runs
    .venv/bin/python -m bench.verify --keys 50000 --runs 5

The dataset is made once: ``--keys`` string keys of 64 bytes are written to a Redis and DUMPed,
and each DUMP is stored as an rrb-streams latest-state object in a folder, exactly as the
uploader stores it. Each run is ``rrb-verify --json`` as a separate process, timed from start to
exit, with its RSS sampled every 0.2 s. Every run must report 0 differences.

Targets (2 cores): a million keys checked with bounded memory (the run's peak RSS stays in the
tens of MB: it keeps 8 bytes per stored key between its passes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import anyio

from bench.common import command, median, rss_mb
from bench.common import redis as start_redis
from rrb_streams.format import codec, layout
from rrb_streams.storage.fs import FsStorage

VALUE = b"v" * 64
CHUNK = 5000


def fill(c: object, folder: Path, keys: int, version: str) -> None:
    """Write ``keys`` keys to the Redis of client ``c`` and their objects to ``folder``."""
    storage = FsStorage(folder)

    async def store() -> None:
        limit = anyio.Semaphore(32)

        async def put(name: str, data: bytes) -> None:
            async with limit:
                await storage.put(name, data)

        for start in range(0, keys, CHUNK):
            names = [f"key:{i:08d}".encode() for i in range(start, min(keys, start + CHUNK))]
            pipe = c.pipeline(transaction=False)  # type: ignore[attr-defined]
            for k in names:
                pipe.set(k, VALUE)
                pipe.dump(k)
            dumps = pipe.execute()[1::2]
            now_us = time.time_ns() // 1000
            async with anyio.create_task_group() as tg:
                for k, payload in zip(names, dumps, strict=True):
                    rec = codec.KeyRecord(k, 0, "string", None, now_us, "0-1", version, payload)
                    tg.start_soon(put, layout.latest_name("", 0, k), codec.encode(rec))
        await storage.flush()
        await storage.close()

    anyio.run(store)


def one_run(url: str, folder: Path) -> tuple[float, float, dict[str, int]]:
    """Seconds, peak RSS in MB and the counts of one ``rrb-verify`` run."""
    env = dict(os.environ, LOG_LEVEL="WARNING")
    started = time.perf_counter()
    proc = subprocess.Popen(
        command("rrb-verify", url, "--storage", str(folder), "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mb(proc.pid)[1])
        except OSError:
            pass  # exited between poll() and the read
        time.sleep(0.2)
    out, err = proc.communicate()
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"rrb-verify exited {proc.returncode}: {err.decode()[-500:]}")
    report = json.loads(out)
    return took, peak, {k: int(report[k]) for k in ("checked", "missing", "stale", "extra")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rrb-bench-verify-") as tmp:
        work = Path(tmp)
        src = start_redis(work / "source")
        try:
            c = src.client()
            version = str(c.info("server")["redis_version"])
            t0 = time.perf_counter()
            fill(c, work / "backup", args.keys, version)
            print(f"dataset: {args.keys:,} keys in {time.perf_counter() - t0:.0f} s", flush=True)
            times, peaks = [], []
            for run in range(1, args.runs + 1):
                took, peak, counts = one_run(src.url(), work / "backup")
                if counts["checked"] != args.keys or any(
                    counts[k] for k in ("missing", "stale", "extra")
                ):
                    raise SystemExit(f"run {run}: differences reported: {counts}")
                times.append(took)
                peaks.append(peak)
                print(
                    f"run {run}: {took:.1f} s, {args.keys / took:,.0f} keys/s, "
                    f"peak RSS {peak:.1f} MB",
                    flush=True,
                )
            t = median(times)
            print(
                f"rrb-verify, {args.keys:,} keys from a folder: median {t:.1f} s "
                f"({args.keys / t:,.0f} keys/s), peak RSS max {max(peaks):.1f} MB"
            )
        finally:
            src.stop()


if __name__ == "__main__":
    main()
