"""Restore benchmarks: from a folder, from S3, and memory.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.restore                  # every figure, median of 3 runs
    .venv/bin/python -m bench.restore --runs 5 --only fs

Every figure is a median over ``--runs`` runs, and each ratio is against a baseline measured in
the same run on the same machine. Targets (2 cores):

======  ==============================================================  =====================
fs      restore 50k keys with 64-byte values from a folder, vs          >= 15,000 keys/s, and
        ``redis-cli --pipe`` loading the same keys as RESTORE commands  the ratio reported
s3      restore 10k keys from S3 (a moto server), vs a raw loop of      >= 70% of the raw
        concurrent GETs against the same server at the same             GET rate
        concurrency
memory  peak RSS of ``rrb-restore`` restoring 200k keys                 < 200 MB
======  ==============================================================  =====================

The dataset is made once per figure: keys are written to a source Redis, DUMPed, and stored
as rrb-streams objects, exactly as the uploader stores them. Each run restores into a fresh
Redis with ``rrb-restore`` as a separate process, timed from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench.common import command, median, rss_mb
from bench.common import redis as start_redis
from rrb_streams import codec, layout, resp
from rrb_streams.storage.base import Storage
from rrb_streams.storage.fs import FsStorage

VALUE = b"v" * 64
S3_CONCURRENCY = 8


def dataset(workdir: Path, n: int) -> list[codec.KeyRecord]:
    """``n`` string keys of 64 bytes, DUMPed from a real Redis, as records."""
    src = start_redis(workdir / "source")
    try:
        c = src.client()
        records: list[codec.KeyRecord] = []
        version = str(c.info("server")["redis_version"])
        for start in range(0, n, 1000):
            keys = [f"key:{i:08d}".encode() for i in range(start, min(n, start + 1000))]
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.set(k, VALUE)
                pipe.dump(k)
            dumps = pipe.execute()[1::2]
            now_us = time.time_ns() // 1000
            records += [
                codec.KeyRecord(k, 0, "string", None, now_us, "0-0", version, d)
                for k, d in zip(keys, dumps, strict=True)
            ]
        return records
    finally:
        src.stop()


async def store(storage: Storage, records: list[codec.KeyRecord], concurrency: int = 16) -> None:
    limiter = anyio.Semaphore(concurrency)

    async def put(rec: codec.KeyRecord) -> None:
        async with limiter:
            await storage.put(layout.latest_name("", rec.db, rec.key), codec.encode(rec))

    async with anyio.create_task_group() as tg:
        for rec in records:
            tg.start_soon(put, rec)
    await storage.flush()


def restore_commands(records: list[codec.KeyRecord]) -> bytes:
    """The baseline's input: one RESTORE … REPLACE per key, in the Redis protocol."""
    return resp.pack([(b"RESTORE", r.key, b"0", r.payload, b"REPLACE") for r in records])


def redis_cli_pipe(url_port: int, data: Path) -> float:
    """Seconds ``redis-cli --pipe`` takes to load ``data``."""
    start = time.perf_counter()
    with data.open("rb") as f:
        subprocess.run(
            ["redis-cli", "-p", str(url_port), "--pipe"],
            stdin=f,
            check=True,
            capture_output=True,
        )
    return time.perf_counter() - start


def run_restore(
    target_url: str,
    storage_url: str,
    *args: str,
    env: dict[str, str] | None = None,
    sample_rss: bool = False,
) -> tuple[float, float]:
    """Run ``rrb-restore`` to the end: (seconds, peak RSS in MiB)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
    full_env.update(env or {})
    full_env["LOG_LEVEL"] = "WARNING"
    start = time.perf_counter()
    proc = subprocess.Popen(
        command("rrb-restore", target_url, "--storage", storage_url, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
    )
    peak = 0.0
    while proc.poll() is None:
        if sample_rss:
            try:
                peak = max(peak, rss_mb(proc.pid)[1])
            except (FileNotFoundError, KeyError):
                pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rrb-restore exited {proc.returncode}: {out.decode()} {err.decode()}")
    return seconds, peak


def bench_fs(runs: int, n: int = 50_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rrb-bench-restore-"))
    try:
        records = dataset(work, n)
        folder = work / "store"
        anyio.run(store, FsStorage(folder), records)
        pipe_file = work / "restore.resp"
        pipe_file.write_bytes(restore_commands(records))
        ours, base = [], []
        for i in range(runs):
            target = start_redis(work / f"t{i}")
            try:
                base.append(redis_cli_pipe(target.port, pipe_file))
                target.client().flushall()
                seconds, _ = run_restore(target.url(), str(folder))
                assert target.client().dbsize() == n, "restore incomplete"
                ours.append(seconds)
            finally:
                target.stop()
        keys_s = n / median(ours)
        base_s = n / median(base)
        return {
            "keys": n,
            "restore_seconds": [round(s, 3) for s in ours],
            "redis_cli_pipe_seconds": [round(s, 3) for s in base],
            "keys_per_second": round(keys_s),
            "baseline_keys_per_second": round(base_s),
            "ratio_to_baseline": round(keys_s / base_s, 3),
            "target_keys_per_second": 15_000,
            "ok": keys_s >= 15_000,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="fs,s3,memory")
    args = p.parse_args()
    benches: dict[str, Callable[[int], dict[str, Any]]] = {"fs": bench_fs}
    results = {}
    for name in args.only.split(","):
        results[name] = benches[name](args.runs)
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
