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
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioboto3
import anyio

from bench.common import command, median, rss_mb
from bench.common import redis as start_redis
from rrb_streams.format import codec, layout
from rrb_streams.storage.base import Storage
from rrb_streams.storage.fs import FsStorage
from rrb_streams.storage.s3 import S3Storage
from rrb_streams.wire import resp
from tests.support.proc import BIN
from tests.support.servers import child_env, free_port
from tests.support.wait import wait_for

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
    full_env = child_env(**{**(env or {}), "LOG_LEVEL": "WARNING"})
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


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server in its own process (so it does not share our interpreter's lock)."""
    port = free_port()
    log = (workdir / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, 20, 0.1)
    except TimeoutError:
        proc.kill()
        raise RuntimeError("moto_server did not start") from None
    return proc, endpoint


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "S3_SERVER": endpoint,
        "S3_ACCESS_KEY": "bench",
        "S3_SECRET_KEY": "bench-secret",
        "S3_REGION": "us-east-1",
        "S3_BUCKET": bucket,
    }


async def raw_gets(endpoint: str, bucket: str, names: list[str], concurrency: int) -> float:
    """The baseline: ``concurrency`` tasks GETting every object once with aioboto3."""
    session = aioboto3.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench-secret", region_name="us-east-1"
    )
    async with session.client("s3", endpoint_url=endpoint) as client:
        queue = iter(names)
        start = time.perf_counter()

        async def worker() -> None:
            for name in queue:
                response = await client.get_object(Bucket=bucket, Key=name)
                async with response["Body"] as body:
                    await body.read()

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return time.perf_counter() - start


def bench_s3(runs: int, n: int = 10_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rrb-bench-restore-s3-"))
    moto, endpoint = start_moto(work)
    try:
        records = dataset(work, n)
        bucket = "rrb-bench"
        env = s3_env(endpoint, bucket)
        storage = S3Storage(
            bucket,
            endpoint_url=endpoint,
            access_key=env["S3_ACCESS_KEY"],
            secret_key=env["S3_SECRET_KEY"],
            region="us-east-1",
        )

        async def setup() -> None:
            session = aioboto3.Session(
                aws_access_key_id="bench",
                aws_secret_access_key="bench-secret",
                region_name="us-east-1",
            )
            async with session.client("s3", endpoint_url=endpoint) as client:
                await client.create_bucket(Bucket=bucket)
            await store(storage, records)
            await storage.close()

        anyio.run(setup)
        names = sorted(layout.latest_name("", 0, r.key) for r in records)
        ours, base = [], []
        for i in range(runs):
            base.append(anyio.run(raw_gets, endpoint, bucket, names, S3_CONCURRENCY))
            target = start_redis(work / f"t{i}")
            try:
                seconds, _ = run_restore(
                    target.url(), f"s3://{bucket}/", "-c", str(S3_CONCURRENCY), env=env
                )
                assert target.client().dbsize() == n, "restore incomplete"
                ours.append(seconds)
            finally:
                target.stop()
        keys_s = n / median(ours)
        gets_s = n / median(base)
        return {
            "keys": n,
            "concurrency": S3_CONCURRENCY,
            "restore_seconds": [round(s, 3) for s in ours],
            "raw_get_seconds": [round(s, 3) for s in base],
            "keys_per_second": round(keys_s),
            "raw_gets_per_second": round(gets_s),
            "ratio_to_raw_gets": round(keys_s / gets_s, 3),
            "target_ratio": 0.7,
            "ok": keys_s / gets_s >= 0.7,
        }
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)


def bench_memory(runs: int, n: int = 200_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rrb-bench-restore-mem-"))
    try:
        records = dataset(work, n)
        folder = work / "store"
        anyio.run(store, FsStorage(folder), records)
        del records
        peaks, seconds = [], []
        for i in range(runs):
            target = start_redis(work / f"t{i}")
            try:
                took, peak = run_restore(target.url(), str(folder), sample_rss=True)
                assert target.client().dbsize() == n, "restore incomplete"
                peaks.append(peak)
                seconds.append(took)
            finally:
                target.stop()
        return {
            "keys": n,
            "peak_rss_mb": [round(p, 1) for p in peaks],
            "median_peak_rss_mb": round(median(peaks), 1),
            "restore_seconds": [round(s, 2) for s in seconds],
            "keys_per_second": round(n / median(seconds)),
            "target_mb": 200,
            "ok": median(peaks) < 200,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="fs,s3,memory")
    args = p.parse_args()
    benches: dict[str, Callable[[int], dict[str, Any]]] = {
        "fs": bench_fs,
        "s3": bench_s3,
        "memory": bench_memory,
    }
    results = {}
    for name in args.only.split(","):
        results[name] = benches[name](args.runs)
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
