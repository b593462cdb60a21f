"""Compaction benchmarks: restore after a snapshot, compaction speed and memory, objects and
requests over a day, and what a month of requests and storage costs.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.compaction                       # every figure, median of 3 runs
    .venv/bin/python -m bench.compaction --only restore_s3 --runs 3 --json out.json
    .venv/bin/python -m bench.compaction --runs 1 --keys 100000 --seconds 20 \\
        --cost-seconds 10 --sim-days 1.2                       # a quick trial

Commands run as their own processes (``rrb``, ``rrb-compact``, ``rrb-restore``, ``moto_server``,
``redis-server``), each ended in a ``finally`` by its own handle; every server listens on
127.0.0.1 only. Peak RSS is the child's own ``VmHWM``, sampled every 20 ms.

==========  ==================================================================  ==========
restore_s3  ``--keys`` 100-character strings (DUMPed by a real Redis) written   <= 60 s and
            as level-0 segments of 10,000 records to a moto S3 server,          <= 3x the
            compacted by ``rrb-compact --snapshot``; then ``rrb-restore -c 8``  baseline
            start to exit, vs downloading every object the restore needs
            (the snapshot's parts) with 8 concurrent GETs plus
            ``redis-cli --pipe`` of the same keys as RESTORE commands.
compaction  ``rrb-compact --snapshot`` of a backup holding 10 generations of    peak RSS
            ``--keys`` keys (generation g rewrites g/10 of them, random:        < 200 MB
            5.5x ``--keys`` records) as level-0 segments of 10,000 records,
            to a folder and to moto S3: records in per second over the whole
            pass (level 1, level 2, snapshot), each step's rate, peak RSS.
objects     a day at 1,000 changes/s with the default schedule. Uploaders:
            ``rrb --no-compaction`` to moto S3 at 1,000 distinct-key changes/s
            for ``--seconds``, requests counted from moto's request log, per
            change, times 86,400,000 changes. Compaction: the real
            ``Compactor`` over an in-memory store that counts requests, on a
            simulated clock (see below); max objects at any moment.
cost        $ per month at ``--rates`` changes/s from the measured request
            counts and stored bytes, S3 Standard prices (PRICES below), next
            to the keys layout (``rrb --layout keys`` measured at
            ``--keys-rate`` for PUTs per change and bytes per object).
==========  ==================================================================  ==========

The simulation (``objects``, ``cost``). One uploader writes one level-0 segment per
simulated second (what ``rrb`` does at these rates: ``--segment-interval`` 1 s, far below
``--segment-bytes``), and a compaction pass runs every simulated 60 s (what ``AutoCompactor``
does with the default ``--level1-every`` 5m). The compactor's clock (its module's ``now_us``)
is the simulation's, so a simulated day takes minutes, and passes take no simulated time.
Records are scaled down by ``S = rate / --sim-records`` (10 records per segment instead of
``rate``), over ``--keys / S`` keys, and with them the byte sizes compaction cuts and groups
by (``Schedule.part_bytes`` and the compactor's ``MERGE_BYTES``/``RUN_BYTES`` budget, divided by
S), so the simulation makes the same objects a real day would. Request counts are reported
as the simulation made them and at real size: a PUT of ``b`` simulated bytes is one PUT of
``b * S`` bytes (multipart above 8 MiB: one PUT per 8 MiB part plus 2 POSTs), the reads of an
object's blocks are ``ceil(b * S / 1 MiB)`` GETs, a tail read whose index would outgrow 64 KiB
at real size takes a second GET. LIST is one request per 1,000 names. The simulation starts
with the keyspace as a first backup (level-0 segments at time 0) and runs ``--sim-days``
(3.03: the third day, from 2 days 30 min on, is steady, with one snapshot, its retention and
the deletions after the grace period); per-day counts are from the last simulated day.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio

from bench.common import redis as start_redis
from bench.common import rss_mb
from bench.restore import raw_gets, start_moto
from bench.segments import (
    S3_CONCURRENCY,
    Rrb,
    code_state,
    fmt,
    medians,
    paced,
    pipe_once,
    read_records,
    restore_once,
    rounded,
    sample,
    scan_chunks,
    table,
    wait_drained,
    wait_ready,
)
from rrb_streams.compact import compactor as compactor_module
from rrb_streams.compact.compactor import Compactor, Schedule
from rrb_streams.format import builder, segment
from rrb_streams.format import manifest as mf
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.merge import RUN_BYTES
from rrb_streams.format.segment import TAIL_READ, TRAILER_SIZE
from rrb_streams.format.view import read_view
from rrb_streams.logs import configure
from rrb_streams.storage.base import ObjectInfo, get_each
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire import resp
from tests.support.moto import boto_client, moto_storage
from tests.support.moto import s3_env as moto_env
from tests.support.proc import BIN
from tests.support.servers import RedisServer, child_env

BUCKET = "rrb-bench-compaction"
PER_SEGMENT = 10_000  # records per level-0 segment in the datasets (a bulk backup's size)
VALUE_BYTES = 100
GENERATIONS = 10
DAY = 86_400
MiB = 1 << 20
S3_PART = 8 * MiB  # S3Storage's default part size and multipart threshold

# S3 Standard, us-east-1, per request and per GB-month (GB = 2**30 bytes); a month is 30 days.
PRICES = {"put_per_1000": 0.005, "get_per_1000": 0.0004, "gb_month": 0.023}
MONTH_DAYS = 30


# --- processes ------------------------------------------------------------------------------


def run_measured(
    argv: list[str], env: dict[str, str], timeout: float = 3600.0
) -> tuple[float, float, str, str]:
    """Run a command to its end: (seconds start to exit, peak RSS MiB, stdout, stderr).
    Raises when it fails. The peak is the child's own VmHWM (a high-water mark), read every
    20 ms until it exits."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    peak = 0.0
    seconds = 0.0
    try:
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                seconds = time.perf_counter() - start
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            try:
                peak = max(peak, rss_mb(proc.pid)[1])
            except (OSError, KeyError):  # exiting: a zombie has no memory left
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"{argv[0]} still running after {timeout} s")
            time.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} exited {proc.returncode}: {texts[0][-2000:]} {texts[1][-2000:]}"
        )
    return seconds, peak, texts[0], texts[1]


def compact_argv(lease: RedisServer, storage: str, *args: str) -> list[str]:
    return [str(BIN / "rrb-compact"), lease.url(), "--storage", storage, "--json", *args]


def run_compact(lease: RedisServer, storage: str, env: dict[str, str]) -> dict[str, Any]:
    """``rrb-compact --snapshot --json``: its report, wall seconds and peak RSS."""
    seconds, peak, out, _ = run_measured(
        compact_argv(lease, storage, "--snapshot"), child_env(LOG_LEVEL="WARNING", **env)
    )
    report = json.loads(out)
    if report.get("lost_race") or report.get("damaged") or report.get("standby"):
        raise RuntimeError(f"rrb-compact did not compact: {out[:2000]}")
    return {"wall_s": seconds, "peak_rss_mb": peak, "report": report}


def upload(endpoint: str, folder: Path, bucket: str = BUCKET) -> tuple[int, int]:
    """Every file under ``folder`` into the bucket, 8 at a time: (objects, bytes)."""
    client = boto_client(endpoint)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())

    def put(path: Path) -> int:
        data = path.read_bytes()
        client.put_object(Bucket=bucket, Key=path.relative_to(folder).as_posix(), Body=data)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(put, paths))
    return len(sizes), sum(sizes)


def bucket_contents(endpoint: str, bucket: str = BUCKET) -> tuple[int, int]:
    """(objects, bytes) the bucket holds."""
    objects = size = 0
    for page in boto_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects += 1
            size += obj["Size"]
    return objects, size


def hard_link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` made of hard links: nothing rewrites a segment in place."""
    for path in source.rglob("*"):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dest)


# --- datasets -------------------------------------------------------------------------------


def random_values(n: int, rnd: random.Random, size: int = VALUE_BYTES) -> list[bytes]:
    """``n`` values of ``size`` base64 characters (6 random bits a byte: they compress to
    about 3/4, as text does)."""
    raw = base64.b64encode(rnd.randbytes(n * size * 3 // 4 + 3))
    return [raw[i * size : (i + 1) * size] for i in range(n)]


_BACKUPS: dict[int, tuple[Path, Path, dict[str, Any]]] = {}


def backup_dataset(shared: Path, n: int) -> tuple[Path, Path, dict[str, Any]]:
    """(folder of level-0 segments, RESTORE commands for redis-cli, description) of ``n`` keys
    ``key:%08d`` holding random 100-character strings, as an uploader's bulk backup writes
    them: read from a real Redis in SCAN order (DUMP, PEXPIRETIME, TYPE), 10,000 records a
    segment. Made once per size."""
    if n in _BACKUPS:
        return _BACKUPS[n]
    work = shared / f"backup-{n}"
    folder = work / "store"
    pipe_file = work / "restore.resp"
    src = start_redis(work / "source")
    started = time.perf_counter()
    segments = stored = 0
    rnd = random.Random(n)
    try:
        c = src.client()
        for lo in range(0, n, 10_000):
            pipe = c.pipeline(transaction=False)
            hi = min(n, lo + 10_000)
            for i, value in zip(range(lo, hi), random_values(hi - lo, rnd), strict=True):
                pipe.set(b"key:%08d" % i, value)
            pipe.execute()
        version = str(c.info("server")["redis_version"])
        stamp = time.time_ns() // 1000
        with pipe_file.open("wb") as pipe_out:
            for keys in scan_chunks(c, PER_SEGMENT):
                records: list[KeyRecord] = []
                for at in range(0, len(keys), 1000):
                    records += read_records(c, keys[at : at + 1000], version, stamp)
                    stamp += 1000
                data = builder.encode_segment(records)
                name = segment.segment_name(
                    "", 0, records[0].stamp, records[-1].stamp, segment.new_uid()
                )
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                segments += 1
                stored += len(data)
                pipe_out.write(
                    resp.pack([(b"RESTORE", r.key, b"0", r.payload, b"REPLACE") for r in records])
                )
    finally:
        src.kill()
    made = {
        "keys": n,
        "segments": segments,
        "stored_mb": round(stored / MiB, 1),
        "made_in_s": round(time.perf_counter() - started, 1),
    }
    print(f"  backup dataset: {json.dumps(made)}", flush=True)
    _BACKUPS[n] = (folder, pipe_file, made)
    return _BACKUPS[n]


def dump_frame(work: Path) -> tuple[bytes, bytes, str]:
    """What a real Redis's DUMP of a 100-character string puts around the value: (head,
    RDB version bytes) and its redis_version."""
    src = start_redis(work)
    try:
        c = src.client()
        value = random_values(1, random.Random(0))[0]  # incompressible: no LZF
        c.set(b"probe", value)
        dump = bytes(c.dump(b"probe"))  # type: ignore[arg-type]
        version = str(c.info("server")["redis_version"])
    finally:
        src.kill()
    at = dump.index(value)
    return dump[:at], dump[at + VALUE_BYTES : at + VALUE_BYTES + 2], version


_GENERATIONS: dict[tuple[int, int], tuple[Path, dict[str, Any]]] = {}


def generations_dataset(shared: Path, n: int, generations: int) -> tuple[Path, dict[str, Any]]:
    """A folder of level-0 segments holding ``generations`` rewrites of ``n`` keys:
    generation g (1..G), read g hours after the first, holds a random g/G of the keys with
    fresh values; 10,000 records a segment. Payloads have a real DUMP's frame (type, length,
    RDB version) around a fresh 100-character value, and 8 random bytes where the CRC goes:
    compaction never opens a payload, and nothing restores these."""
    if (n, generations) in _GENERATIONS:
        return _GENERATIONS[(n, generations)]
    work = shared / f"generations-{n}-{generations}"
    folder = work / "store"
    head, rdb_version, version = dump_frame(work / "probe")
    rnd = random.Random(generations * 1_000_003 + n)
    started = time.perf_counter()
    base_us = time.time_ns() // 1000 - generations * 3600 * 1_000_000
    stamp = base_us
    segments = stored = records_total = 0
    for g in range(1, generations + 1):
        size = round(n * g / generations)
        keys = rnd.sample(range(n), size)
        read_at = base_us + g * 3600 * 1_000_000
        for lo in range(0, size, PER_SEGMENT):
            chunk = keys[lo : lo + PER_SEGMENT]
            values = random_values(len(chunk), rnd)
            tails = rnd.randbytes(8 * len(chunk))
            records = [
                KeyRecord(
                    b"key:%08d" % k,
                    0,
                    "string",
                    None,
                    read_at + j,
                    f"{read_at // 1000}-{j}",
                    version,
                    head + values[j] + rdb_version + tails[8 * j : 8 * j + 8],
                    False,
                    stamp + j,
                )
                for j, k in enumerate(chunk)
            ]
            data = builder.encode_segment(records)
            name = segment.segment_name("", 0, stamp, stamp + len(chunk) - 1, segment.new_uid())
            stamp += len(chunk)
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            segments += 1
            stored += len(data)
            records_total += len(chunk)
    made = {
        "keys": n,
        "generations": generations,
        "records": records_total,
        "segments": segments,
        "stored_mb": round(stored / MiB, 1),
        "made_in_s": round(time.perf_counter() - started, 1),
    }
    print(f"  generations dataset: {json.dumps(made)}", flush=True)
    _GENERATIONS[(n, generations)] = (folder, made)
    return _GENERATIONS[(n, generations)]


# --- 1. restore from S3 after a snapshot ------------------------------------------------------


async def view_objects(endpoint: str) -> list[ObjectInfo]:
    """The objects a restore of the latest state reads (its view)."""
    storage = moto_storage(BUCKET, endpoint)
    try:
        return (await read_view(storage, "")).objects
    finally:
        await storage.close()


def restore_s3_runs(work: Path, shared: Path, n: int, runs: int) -> list[dict[str, Any]]:
    folder, pipe_file, made = backup_dataset(shared, n)
    moto, endpoint = start_moto(work)
    lease = start_redis(work / "lease")
    out = []
    try:
        boto_client(endpoint).create_bucket(Bucket=BUCKET)
        upload(endpoint, folder)
        compacted = run_compact(lease, f"s3://{BUCKET}/", moto_env(endpoint))
        steps = {s["step"]: s for s in compacted["report"]["steps"]}
        if steps.get("snapshot", {}).get("records_out") != n:
            raise RuntimeError(f"the snapshot holds {steps.get('snapshot')} records, not {n}")
        view = anyio.run(view_objects, endpoint)
        names = [i.name for i in view]
        bucket_objects, _ = bucket_contents(endpoint)
        print(
            f"  compacted in {compacted['wall_s']:.1f} s (peak {compacted['peak_rss_mb']:.0f} MB): "
            f"a restore reads {len(view)} objects, {sum(i.size for i in view) / MiB:.1f} MiB; "
            f"the bucket holds {bucket_objects} (merged inputs wait out the grace period)",
            flush=True,
        )
        for i in range(runs):
            download_s = anyio.run(raw_gets, endpoint, BUCKET, names, S3_CONCURRENCY)
            pipe_s = pipe_once(work, f"pipe{i}", n, pipe_file)
            seconds, peak = restore_once(
                work,
                f"t{i}",
                n,
                f"s3://{BUCKET}/",
                "-c",
                str(S3_CONCURRENCY),
                env=moto_env(endpoint),
            )
            base = download_s + pipe_s
            out.append(
                {
                    "keys": n,
                    "level0_segments": made["segments"],
                    "objects_read": len(view),
                    "read_mb": sum(i.size for i in view) / MiB,
                    "bucket_objects": bucket_objects,
                    "compact_s": compacted["wall_s"],
                    "compact_peak_rss_mb": compacted["peak_rss_mb"],
                    "restore_s": seconds,
                    "download_s": download_s,
                    "pipe_s": pipe_s,
                    "baseline_s": base,
                    "keys_per_s": n / seconds,
                    "ratio": seconds / base,
                    "peak_rss_mb": peak,
                }
            )
            print(f"  restore_s3 run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    finally:
        lease.kill()
        moto.kill()
        moto.wait()
    return out


# --- 2. compaction speed and memory -----------------------------------------------------------


def compact_once(work: Path, folder: Path, where: str) -> dict[str, Any]:
    """One ``rrb-compact --snapshot`` of a fresh copy of ``folder`` (in a folder or moto)."""
    lease = start_redis(work / "lease")
    moto: subprocess.Popen[bytes] | None = None
    try:
        if where == "s3":
            moto, endpoint = start_moto(work)
            boto_client(endpoint).create_bucket(Bucket=BUCKET)
            upload(endpoint, folder)
            storage, env = f"s3://{BUCKET}/", moto_env(endpoint)
        else:
            store = work / "store"
            hard_link_tree(folder, store)
            os.sync()
            storage, env = str(store), {}
        return run_compact(lease, storage, env)
    finally:
        lease.kill()
        if moto is not None:
            moto.kill()
            moto.wait()


def compaction_runs(
    work: Path, shared: Path, n: int, generations: int, runs: int, where: Sequence[str]
) -> list[dict[str, Any]]:
    folder, made = generations_dataset(shared, n, generations)
    out = []
    for i in range(runs):
        row: dict[str, Any] = {
            "keys": n,
            "generations": generations,
            "records": made["records"],
            "level0_segments": made["segments"],
            "dataset_mb": made["stored_mb"],
        }
        for w in where:
            done = compact_once(work / f"{w}{i}", folder, w)
            steps = {s["step"]: s for s in done["report"]["steps"]}
            snap = steps.get("snapshot")
            if snap is None or snap["records_out"] != n:
                raise RuntimeError(f"{w}: the snapshot holds {snap} records, not {n}")
            records_in = sum(s["records_in"] for s in steps.values())
            row |= {
                f"{w}_wall_s": done["wall_s"],
                f"{w}_pass_s": done["report"]["seconds"],
                f"{w}_records_in": records_in,
                f"{w}_records_out": snap["records_out"],
                f"{w}_records_in_per_s": records_in / done["wall_s"],
                f"{w}_peak_rss_mb": done["peak_rss_mb"],
                f"{w}_mb_read": sum(s["bytes_in"] for s in steps.values()) / MiB,
                f"{w}_mb_written": sum(s["bytes_out"] for s in steps.values()) / MiB,
            }
            for name, s in steps.items():
                row |= {
                    f"{w}_{name}_inputs": s["inputs"],
                    f"{w}_{name}_outputs": s["outputs"],
                    f"{w}_{name}_records_in": s["records_in"],
                    f"{w}_{name}_s": s["seconds"],
                    f"{w}_{name}_records_in_per_s": s["records_in"] / max(s["seconds"], 1e-9),
                }
        out.append(row)
        print(f"  compaction run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    return out


# --- 3. uploaders' requests, counted by the moto server ------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/[\d.]+" (\d+)')


def server_requests(log: Path, offset: int) -> Counter[str]:
    """S3 requests in moto's log after byte ``offset``, by kind: PUT (objects and parts),
    POST (multipart create and complete), GET, LIST, DELETE, HEAD."""
    with log.open("rb") as f:
        f.seek(offset)
        text = _ANSI.sub("", f.read().decode(errors="replace"))
    out: Counter[str] = Counter()
    for method, target, _status in _REQUEST.findall(text):
        path, _, query = target.partition("?")
        has_key = "/" in path.strip("/")
        if method == "GET" and (not has_key or "list-type" in query):
            out["LIST"] += 1
        else:
            out[method] += 1
    return out


def uploader_requests(work: Path, rate: int, seconds: float, layout: str) -> dict[str, Any]:
    """``rrb`` (compaction off) to moto S3 at ``rate`` distinct-key changes/s for
    ``seconds``: the requests moto served from the first change to drained."""
    moto, endpoint = start_moto(work)
    server: RedisServer | None = None
    rrb: Rrb | None = None
    log = work / "moto.log"
    try:
        boto_client(endpoint).create_bucket(Bucket=BUCKET)
        server = start_redis(work / "redis")
        c = server.client()
        args = ["--no-compaction"] if layout == "segments" else ["--layout", "keys"]
        rrb = Rrb(work, server.url(), f"s3://{BUCKET}/", *args, **moto_env(endpoint)).start()
        wait_ready(rrb, c)
        before = rrb.scrape()
        offset = log.stat().st_size
        changes, took = paced(c, rate, seconds, lambda i: b"chg:%d" % i)
        wait_drained(c, 600)
        after = rrb.scrape()
        time.sleep(0.5)  # moto logs a request after answering it
        counts = server_requests(log, offset)
        objects, stored = bucket_contents(endpoint)
    finally:
        if rrb is not None:
            rrb.stop()
        if server is not None:
            server.kill()
        moto.kill()
        moto.wait()
    per_day = rate * DAY / changes
    calls = {
        f"rrb_{dict(labels)['op']}_calls": value - before.get((name, labels), 0.0)  # type: ignore[operator]
        for (name, labels), value in after.items()
        if name == "rrb_storage_call_seconds_count"
    }
    row: dict[str, Any] = {
        "rate": rate,
        "changes": changes,
        "achieved_rate": changes / took,
        "objects": objects,
        "stored_bytes": stored,
        "bytes_per_object": stored / max(1, objects),
        "segment_records": sample(after, "rrb_upload_segment_records_total")
        - sample(before, "rrb_upload_segment_records_total"),
        **calls,
    }
    for kind in ("PUT", "POST", "GET", "LIST", "DELETE", "HEAD"):
        row[kind] = counts.get(kind, 0)
        row[f"{kind}_per_change"] = counts.get(kind, 0) / changes
        row[f"{kind}_per_day"] = counts.get(kind, 0) * per_day
    return row


def uploader_runs(work: Path, rate: int, seconds: float, runs: int, layout: str) -> list[dict]:
    out = []
    for i in range(runs):
        run_dir = work / f"{layout}-{rate}-{i}"
        run_dir.mkdir(parents=True)
        out.append(uploader_requests(run_dir, rate, seconds, layout))
        print(
            f"  uploader {layout} {rate}/s run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True
        )
    return out


# --- 3. compaction over a simulated day ---------------------------------------------------------

KINDS = ("PUT", "POST", "GET", "LIST", "DELETE")


def put_requests(size: int) -> Counter[str]:
    """What ``S3Storage.put`` sends for ``size`` bytes: one PUT, or a multipart upload."""
    if size <= S3_PART:
        return Counter(PUT=1)
    part = max(S3_PART, -(-size // 10_000))
    return Counter(PUT=-(-size // part), POST=2)


class Live:
    """The objects in storage at each moment: how many, how many bytes, and the peaks."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.bytes = 0
        self.peak_objects = 0
        self.peak_at_s = 0
        self.peak_bytes = 0
        self.hour_peak = 0  # objects at most since the last hour mark
        self.now_s = 0

    def put(self, name: str, size: int) -> None:
        self.bytes += size - self.sizes.get(name, 0)
        self.sizes[name] = size
        if len(self.sizes) > self.peak_objects:
            self.peak_objects = len(self.sizes)
            self.peak_at_s = self.now_s
        self.hour_peak = max(self.hour_peak, len(self.sizes))
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def delete(self, name: str) -> None:
        self.bytes -= self.sizes.pop(name, 0)

    def by_level(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for name in self.sizes:
            parsed = segment.parse_segment_name(name)
            out[f"level{parsed.level}" if parsed is not None else name.split("/", 1)[0]] += 1
        return dict(sorted(out.items()))


class Stuck(Exception):
    """A pass that does not end: it commits version after version, or its outputs pile up."""


class Counting:
    """A :class:`~rrb_streams.storage.base.Storage` that counts the S3 requests its calls
    would be, as made (``sim``) and at ``scale`` times the bytes (``real``), and keeps
    :class:`Live` up to date. Raises :class:`Stuck` when a pass commits more than
    ``commit_limit`` manifest versions, or the store outgrows ``byte_limit``."""

    def __init__(self, inner: MemoryStorage, live: Live, scale: int) -> None:
        self.inner = inner
        self.live = live
        self.scale = scale
        self.sim: Counter[str] = Counter()
        self.real: Counter[str] = Counter()
        self._read: Counter[str] = Counter()  # block bytes read per object, this pass
        # What each manifest version of this pass did: a step (its own ``last``), a damaged
        # input set aside, or something else (deletions, retention, orphans).
        self.commits: Counter[str] = Counter()
        self._last_at: Any = None
        self._damaged = 0
        self.commit_limit = 0
        self.byte_limit = 0

    @property
    def description(self) -> str:
        return "counting memory://"

    async def check(self) -> None:
        return None

    async def put(self, name: str, data: bytes) -> None:
        self.sim += put_requests(len(data))
        self.real += put_requests(len(data) * self.scale)
        await self.inner.put(name, data)
        self.live.put(name, len(data))
        if self.byte_limit and self.live.bytes > self.byte_limit:
            raise Stuck(f"the store outgrew {self.byte_limit / 2**30:.1f} GiB (simulated)")

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        await self.put(name, await anyio.to_thread.run_sync(b"".join, chunks))

    async def put_new(self, name: str, data: bytes) -> None:
        self.sim["PUT"] += 1
        self.real["PUT"] += 1
        if mf.is_manifest_name(name):
            m = mf.decode(data, name)
            damaged = [e.name for e in m.objects if e.damaged]
            if len(damaged) > self._damaged:
                self.commits[f"set aside as damaged: {damaged[-1]}"] += 1
            elif m.last.get("at_us") != self._last_at:
                self.commits[f"step {m.last.get('step')}"] += 1
            else:
                self.commits["other"] += 1
            self._damaged, self._last_at = len(damaged), m.last.get("at_us")
            if self.commit_limit and sum(self.commits.values()) > self.commit_limit:
                raise Stuck(
                    f"{sum(self.commits.values())} manifest versions in one pass: "
                    + ", ".join(f"{n} x {what}" for what, n in self.commits.most_common(4))
                )
        await self.inner.put_new(name, data)
        self.live.put(name, len(data))

    async def get(self, name: str) -> bytes:
        self.sim["GET"] += 1
        self.real["GET"] += 1
        return await self.inner.get(name)

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        data = await self.inner.get_range(name, start, length)
        self.sim["GET"] += 1
        if start < 0:
            self.real["GET"] += 1 + self._second_tail_read(data)
        else:
            self._read[name] += len(data)
        return data

    def _second_tail_read(self, data: bytes) -> int:
        """1 when this tail held the whole index but the index at real size would not fit
        the first read of ``TAIL_READ`` bytes."""
        if not TRAILER_SIZE <= len(data) <= TAIL_READ:
            return 0
        index_length = struct.unpack_from(">QI", data, len(data) - TRAILER_SIZE)[1]
        held = index_length + TRAILER_SIZE <= len(data)
        return int(held and index_length * self.scale + TRAILER_SIZE > TAIL_READ)

    async def get_many(self, names: Sequence[str]) -> list[bytes | Any]:
        return await get_each(self, names)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        self.sim["LIST"] += 1
        self.real["LIST"] += 1
        listed = 0
        async for info in self.inner.list(prefix):
            if listed and listed % 1000 == 0:  # the next page
                self.sim["LIST"] += 1
                self.real["LIST"] += 1
            listed += 1
            yield info

    async def delete(self, name: str) -> None:
        self.sim["DELETE"] += 1
        self.real["DELETE"] += 1
        await self.inner.delete(name)
        self.live.delete(name)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        return None

    def settle(self) -> None:
        """End of a pass: the block reads of each object, as GETs of up to RUN_BYTES."""
        for got in self._read.values():
            self.real["GET"] += max(1, -(-got * self.scale // RUN_BYTES))
        self._read.clear()


class QuietLog:
    """The compactor's logger: keeps warnings and errors, drops the rest."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        return None

    debug = info

    def warning(self, event: str, **kw: Any) -> None:
        self.problems.append((event, kw))

    error = warning


async def always() -> bool:
    return True


@contextlib.contextmanager
def simulated(clock: list[int], scale: int, fan_in: int | None) -> Iterator[list[str]]:
    """The compactor reads the simulation's clock, and its merge budget shrinks with the
    records; ``fan_in`` replaces its ``FAN_IN`` (a what-if). Yields the names it replaced."""
    saved: dict[str, Any] = {"now_us": compactor_module.now_us}
    if fan_in is not None:
        saved["FAN_IN"] = compactor_module.FAN_IN
        compactor_module.FAN_IN = fan_in
    for name in ("MERGE_BYTES", "RUN_BYTES"):
        if hasattr(compactor_module, name):
            saved[name] = getattr(compactor_module, name)
    compactor_module.now_us = lambda: clock[0]  # type: ignore[assignment]
    for name in ("MERGE_BYTES", "RUN_BYTES"):
        if name in saved:
            setattr(compactor_module, name, max(1, saved[name] // scale))
    try:
        yield list(saved)
    finally:
        for name, value in saved.items():
            setattr(compactor_module, name, value)


def diff(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in KINDS}


async def simulate(
    rate: int,
    days: float,
    space: int,
    sim_records: int = 10,
    look_s: int = 60,
    seed: int = 1,
    fan_in: int | None = None,
) -> dict[str, Any]:
    """A simulated run of one uploader at ``rate`` changes/s over ``space`` keys with
    compaction on the default schedule; see the module's docstring. ``fan_in``: a what-if,
    the snapshot's ``FAN_IN`` replaced."""
    scale = max(1, round(rate / sim_records))
    per_second = rate / scale
    keys = max(1, space // scale)
    rnd = random.Random(seed)
    pool = base64.b64encode(rnd.randbytes(3 * MiB))
    store = MemoryStorage()
    live = Live()
    uploader = Counting(store, live, scale)
    comp = Counting(store, live, scale)
    comp.commit_limit = 30
    comp.byte_limit = 3 << 30
    start_us = time.time_ns() // 1000
    clock = [start_us]
    log = QuietLog()
    schedule = Schedule(part_bytes=max(1, Schedule().part_bytes // scale))
    compactor = Compactor(comp, "", schedule, log, holds=always, writer="bench")
    stamp = start_us
    dump_head, dump_tail = b"\x00\x40\x64", b"\x0b\x00"  # a DUMP's frame, 100 bytes

    def records(count: int, at_us: int, chosen: Iterable[int]) -> list[KeyRecord]:
        nonlocal stamp
        out = []
        step = 1_000_000 // max(1, count)
        for j, k in enumerate(chosen):
            o = rnd.randrange(len(pool) - VALUE_BYTES)
            out.append(
                KeyRecord(
                    b"key:%08d" % k,
                    0,
                    "string",
                    None,
                    at_us + j * step,
                    f"{at_us // 1000}-{j}",
                    "7.2.0",
                    dump_head + pool[o : o + VALUE_BYTES] + dump_tail + rnd.randbytes(8),
                    False,
                    stamp + j,
                )
            )
        stamp += len(out)
        return out

    async def write(recs: list[KeyRecord]) -> None:
        data = builder.encode_segment(recs)
        name = segment.segment_name("", 0, recs[0].stamp, recs[-1].stamp, segment.new_uid())
        await uploader.put(name, data)

    total = int(days * DAY)
    # Every hour: the counters so far, the mean bytes stored and the most objects that hour.
    marks: list[tuple[Counter[str], Counter[str], Counter[str]]] = []
    hours: list[dict[str, Any]] = []
    passes: list[dict[str, Any]] = []
    stuck: str | None = None
    hour_bytes = 0.0
    real_started = time.perf_counter()
    carry = 0.0
    with simulated(clock, scale, fan_in) as replaced:
        # The keyspace, as a first backup writes it: before the first hour mark.
        for lo in range(0, keys, PER_SEGMENT):
            hi = min(keys, lo + PER_SEGMENT)
            await write(records(hi - lo, start_us, range(lo, hi)))
        marks.append((uploader.real.copy(), comp.real.copy(), comp.sim.copy()))
        for s in range(1, total + 1):
            clock[0] = start_us + s * 1_000_000
            live.now_s = s
            carry += per_second
            count = int(carry)
            carry -= count
            if count:
                chosen = [rnd.randrange(keys) for _ in range(count)]
                await write(records(count, clock[0] - 1_000_000, chosen))
            if s % look_s == 0:
                comp.commits.clear()
                seq = compactor.manifest.seq
                t = time.perf_counter()
                try:
                    report = await compactor.run_pass()
                except Stuck as exc:
                    m = compactor.manifest
                    history = [e for e in m.objects if e.sealed is None and e.snapshot is None]
                    stuck = (
                        f"the pass at {s / 3600:.2f} simulated hours: {exc}; the last "
                        f"committed version has {len(history)} unsealed objects above level 0 "
                        f"({sum(e.size for e in history) * scale / 2**30:.1f} GiB at real "
                        f"size), its last step {m.last.get('step')} merged "
                        f"{m.last.get('inputs')} objects into {m.last.get('outputs')}; "
                        f"{time.perf_counter() - t:.0f} s of real time in this pass"
                    )
                    break
                comp.settle()
                if compactor.manifest.seq != seq and compactor.manifest.written_us != clock[0]:
                    raise RuntimeError("the compactor does not read the simulated clock")
                if report.steps or report.deleted or report.retired:
                    passes.append(
                        {
                            "at_h": round(s / 3600, 3),
                            "steps": [
                                (x.step, x.inputs, x.outputs, x.records_in) for x in report.steps
                            ],
                            "deleted": report.deleted,
                            "retired": report.retired,
                            "real_s": round(time.perf_counter() - t, 3),
                        }
                    )
            hour_bytes += live.bytes
            if s % 3600 == 0:
                marks.append((uploader.real.copy(), comp.real.copy(), comp.sim.copy()))
                hours.append(
                    {
                        "objects": len(live.sizes),
                        "most_objects": live.hour_peak,
                        "mean_real_gib": hour_bytes / 3600 * scale / 2**30,
                        **live.by_level(),
                    }
                )
                hour_bytes = 0.0
                live.hour_peak = len(live.sizes)
    # The steady window: the last 24 whole hours (fewer in a short trial), from hour 1 on.
    end_h = len(marks) - 1
    start_h = max(1, end_h - 24)
    out: dict[str, Any] = {
        "rate": rate,
        "scale": scale,
        "records_per_segment": per_second,
        "keys_simulated": keys,
        "keys_real": space,
        "simulated_days": round(live.now_s / DAY, 3),
        "real_seconds": round(time.perf_counter() - real_started, 1),
        "patched": replaced,
        "fan_in_what_if": fan_in,
        "peak_objects": live.peak_objects,
        "peak_at_h": round(live.peak_at_s / 3600, 2),
        "peak_hour": max(
            ({"hour": h, **x} for h, x in enumerate(hours)),
            key=lambda x: x["most_objects"],
            default={},
        ),
        "peak_real_gib": live.peak_bytes * scale / 2**30,
        "passes_with_work": len(passes),
        "slowest_pass_real_s": max((p["real_s"] for p in passes), default=0.0),
        "snapshots": [p for p in passes if any(x[0] == "snapshot" for x in p["steps"])],
        "log_problems": log.problems[:20],
        "stuck": stuck,
        "hours": hours,
    }
    if end_h > start_h:
        per_day = 24 / (end_h - start_h)
        window = hours[start_h:end_h]
        up0, comp0, sim0 = marks[start_h]
        up1, comp1, sim1 = marks[end_h]
        out |= {
            "window_h": (start_h, end_h),
            "window_peak_objects": max(x["most_objects"] for x in window),
            "window_mean_real_gib": sum(x["mean_real_gib"] for x in window) / len(window),
            "window_end_real_gib": window[-1]["mean_real_gib"],
            "uploader_per_day": {k: v * per_day for k, v in diff(up1, up0).items()},
            "compaction_per_day": {k: v * per_day for k, v in diff(comp1, comp0).items()},
            "compaction_per_day_as_simulated": {
                k: v * per_day for k, v in diff(sim1, sim0).items()
            },
        }
    return out


_SIMS: dict[tuple[int, float, int, int, int | None], dict[str, Any]] = {}


def simulation(
    rate: int, days: float, space: int, sim_records: int, fan_in: int | None = None
) -> dict[str, Any]:
    key = (rate, days, space, sim_records, fan_in)
    if key not in _SIMS:
        what_if = f" (what-if: FAN_IN {fan_in})" if fan_in is not None else ""
        print(f"  simulating {days} days at {rate:,} changes/s{what_if} ...", flush=True)
        result = run_simulation(rate, days, space, sim_records, fan_in)
        short = {k: v for k, v in result.items() if k not in ("hours", "snapshots")}
        print(f"  simulation {rate}/s: {json.dumps(short, default=str)}", flush=True)
        _SIMS[key] = result
    return _SIMS[key]


def run_simulation(
    rate: int, days: float, space: int, sim_records: int, fan_in: int | None
) -> dict[str, Any]:
    return anyio.run(functools.partial(simulate, rate, days, space, sim_records, fan_in=fan_in))


_UPLOADERS: dict[tuple[int, str], list[dict[str, Any]]] = {}


def uploaders(work: Path, rate: int, seconds: float, runs: int, layout: str) -> list[dict]:
    if (rate, layout) not in _UPLOADERS:
        _UPLOADERS[(rate, layout)] = uploader_runs(work, rate, seconds, runs, layout)
    return _UPLOADERS[(rate, layout)]


def objects_figure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    rate = 1000
    up = uploaders(work, rate, args.seconds, args.runs, "segments")
    sim = simulation(rate, args.sim_days, args.keys, args.sim_records, args.sim_fan_in)
    return {"runs": up, "median": medians(up), "simulation": sim}


# --- 4. cost ----------------------------------------------------------------------------------


def monthly(put_class: float, gets: float, gib: float) -> dict[str, float]:
    """$ per month of ``put_class`` PUT/POST/LIST and ``gets`` GET requests a day, and ``gib``
    stored."""
    requests = (
        (put_class * PRICES["put_per_1000"] + gets * PRICES["get_per_1000"]) / 1000 * MONTH_DAYS
    )
    storage = gib * PRICES["gb_month"]
    return {"requests": requests, "storage": storage, "total": requests + storage}


def cost_figure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    keys_runs = uploaders(work, args.keys_rate, args.cost_seconds, args.runs, "keys")
    keys_m = medians(keys_runs)
    rows = []
    for rate in args.rates:
        seconds = args.seconds if rate == 1000 else args.cost_seconds
        up = medians(uploaders(work, rate, seconds, args.runs, "segments"))
        sim = simulation(rate, args.sim_days, args.keys, args.sim_records, args.sim_fan_in)
        comp = sim.get("compaction_per_day")
        if comp is None:
            rows.append({"rate": rate, "error": f"simulation incomplete: {sim['stuck']}"})
            continue
        # A simulation stuck before its first snapshot never reached retention: its window
        # is the first day, whose store ends holding one day of history; a steady one holds
        # one to two.
        stuck = sim["stuck"] is not None
        first_day = stuck and not sim["snapshots"]
        up_put = up["PUT_per_day"] + up["POST_per_day"]
        up_list = up["LIST_per_day"]
        up_get = up["GET_per_day"]
        comp_put = comp["PUT"] + comp["POST"]
        seg_gib = sim["window_end_real_gib"] * 1.5 if first_day else sim["window_mean_real_gib"]
        seg = monthly(up_put + up_list + comp_put + comp["LIST"], up_get + comp["GET"], seg_gib)
        keys_put = (keys_m["PUT_per_change"] + keys_m["POST_per_change"]) * rate * DAY
        keys_list = keys_m["LIST_per_change"] * rate * DAY
        keys_get = keys_m["GET_per_change"] * rate * DAY
        keys_gib = args.keys * keys_m["bytes_per_object"] / 2**30
        keys = monthly(keys_put + keys_list, keys_get, keys_gib)
        rows.append(
            {
                "rate": rate,
                "stuck": stuck,
                "first_day_only": first_day,
                "uploader_put_per_day": up_put,
                "uploader_get_per_day": up_get,
                "uploader_list_per_day": up_list,
                "compaction_put_per_day": comp_put,
                "compaction_get_per_day": comp["GET"],
                "compaction_list_per_day": comp["LIST"],
                "compaction_delete_per_day": comp["DELETE"],
                "segments_gib": seg_gib,
                "segments_requests_usd": seg["requests"],
                "segments_storage_usd": seg["storage"],
                "segments_usd": seg["total"],
                "keys_put_per_day": keys_put,
                "keys_gib": keys_gib,
                "keys_requests_usd": keys["requests"],
                "keys_storage_usd": keys["storage"],
                "keys_usd": keys["total"],
                "keys_over_segments": keys["total"] / seg["total"],
            }
        )
        print(f"  cost {rate}/s: {json.dumps(rounded(rows[-1]))}", flush=True)
    return {"keys_layout": keys_m, "keys_runs": keys_runs, "rows": rows, "prices": PRICES}


# --- report -----------------------------------------------------------------------------------


def peak_objects(sim: dict[str, Any]) -> int:
    """The most objects at any moment: before the stuck pass, when one was."""
    return int(sim["window_peak_objects"] if sim["stuck"] else sim["peak_objects"])


def n0(v: float) -> str:
    return f"{v:,.0f}"


def rows_for(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (what, measured, baseline, ratio, target, met)."""
    if name == "restore_s3":
        m = result["median"]
        return [
            {
                "what": f"restore {m['keys']:,.0f} keys from moto S3 after a snapshot (-c 8)",
                "measured": f"{fmt(m['restore_s'], ' s')} ({fmt(m['keys_per_s'], '/s')})",
                "baseline": f"GET {m['objects_read']:.0f} objects {fmt(m['download_s'], ' s')} + "
                f"pipe {fmt(m['pipe_s'], ' s')} = {fmt(m['baseline_s'], ' s')}",
                "ratio": f"{m['ratio']:.2f}x",
                "target": "<= 60 s and <= 3x",
                "met": ("yes" if m["restore_s"] <= 60 else "NO")
                + " / "
                + ("yes" if m["ratio"] <= 3 else "NO"),
            }
        ]
    if name == "compaction":
        m = result["median"]
        return [
            {
                "what": f"rrb-compact --snapshot, {m['keys']:,.0f} keys x "
                f"{m['generations']:.0f} generations ({m['records']:,.0f} records), "
                + ("folder" if w == "fs" else "moto S3"),
                "measured": f"{fmt(m[f'{w}_records_in_per_s'], '/s')} records in "
                f"({m[f'{w}_records_in']:,.0f} in {fmt(m[f'{w}_wall_s'], ' s', 1)}); "
                f"snapshot step {fmt(m.get(f'{w}_snapshot_records_in_per_s'), '/s')}",
                "baseline": "-",
                "ratio": "-",
                "target": "peak RSS < 200 MB",
                "met": f"{fmt(m[f'{w}_peak_rss_mb'], ' MB', 0)}: "
                + ("yes" if m[f"{w}_peak_rss_mb"] < 200 else "NO"),
            }
            for w in result["where"]
        ]
    if name == "objects":
        m = result["median"]
        sim = result["simulation"]
        rows = [
            {
                "what": "uploader requests/day at 1,000 changes/s (measured, moto log)",
                "measured": f"PUT {n0(m['PUT_per_day'])}, GET {n0(m['GET_per_day'])}, "
                f"LIST {n0(m['LIST_per_day'])}",
                "baseline": "-",
                "ratio": "-",
                "target": "-",
                "met": "-",
            }
        ]
        if sim.get("compaction_per_day"):
            c = sim["compaction_per_day"]
            rows.append(
                {
                    "what": "compaction requests/day (simulated day, real size)",
                    "measured": f"PUT {n0(c['PUT'] + c['POST'])}, GET {n0(c['GET'])}, "
                    f"LIST {n0(c['LIST'])}, DELETE {n0(c['DELETE'])}",
                    "baseline": "-",
                    "ratio": "-",
                    "target": "-",
                    "met": "-",
                }
            )
        rows.append(
            {
                "what": "max objects at any moment (simulation)",
                "measured": f"{peak_objects(sim):,}"
                + (" (before the stuck pass); STUCK: a pass never ended" if sim["stuck"] else ""),
                "baseline": "-",
                "ratio": "-",
                "target": "-",
                "met": "-" if not sim["stuck"] else "NO",
            }
        )
        return rows
    if name == "cost":
        return [
            {
                "what": f"$/month at {r['rate']:,} changes/s",
                "measured": r.get("error")
                or f"segments ${r['segments_usd']:,.2f} (storage {r['segments_gib']:.1f} GiB)",
                "baseline": "-" if "error" in r else f"keys layout ${r['keys_usd']:,.2f}",
                "ratio": "-" if "error" in r else f"{r['keys_over_segments']:,.1f}x cheaper",
                "target": "-",
                "met": "-",
            }
            for r in result["rows"]
        ]
    raise ValueError(name)


def markdown(report: dict[str, Any]) -> str:
    """The figures as a Markdown section for the README."""
    figs = report["figures"]
    lines = [
        "| what | how measured | result | target |",
        "|---|---|---|---|",
    ]
    runs = report["args"]["runs"]
    if "median" in figs.get("restore_s3", {}):
        m = figs["restore_s3"]["median"]
        r = figs["restore_s3"]["runs"]
        lines.append(
            f"| restore after a snapshot, moto S3 | {m['keys']:,.0f} keys (100-character "
            f"strings) as {m['level0_segments']:.0f} level-0 segments, `rrb-compact --snapshot`, "
            f"then `rrb-restore -c 8` start to exit, vs GETting the {m['objects_read']:.0f} "
            f"objects it reads with 8 concurrent GETs plus `redis-cli --pipe` | "
            f"**{m['restore_s']:.1f} s** ({m['keys_per_s']:,.0f} keys/s; runs "
            f"{min(x['restore_s'] for x in r):.1f} to {max(x['restore_s'] for x in r):.1f} s), "
            f"**{m['ratio']:.2f}x** the baseline ({m['baseline_s']:.1f} s: GETs "
            f"{m['download_s']:.1f} s + pipe {m['pipe_s']:.1f} s); peak RSS "
            f"{m['peak_rss_mb']:.0f} MB | at most 60 s and 3x |"
        )
    if "median" in figs.get("compaction", {}):
        m = figs["compaction"]["median"]
        for w in figs["compaction"]["where"]:
            steps = ", ".join(
                f"{s} {m[f'{w}_{s}_records_in_per_s']:,.0f}/s"
                for s in ("level1", "level2", "snapshot")
                if f"{w}_{s}_records_in_per_s" in m
            )
            lines.append(
                f"| compaction, {'a folder' if w == 'fs' else 'moto S3'} | `rrb-compact "
                f"--snapshot` of {m['keys']:,.0f} keys in {m['generations']:.0f} generations "
                f"({m['records']:,.0f} records, {m['level0_segments']:.0f} level-0 segments): "
                f"level 1, level 2, snapshot | **{m[f'{w}_records_in_per_s']:,.0f} records in/s** "
                f"({m[f'{w}_records_in']:,.0f} in, {m[f'{w}_records_out']:,.0f} out, "
                f"{m[f'{w}_wall_s']:.0f} s; {steps}); peak RSS **{m[f'{w}_peak_rss_mb']:.0f} MB** "
                f"| under 200 MB |"
            )
    if "simulation" in figs.get("objects", {}):
        m = figs["objects"]["median"]
        sim = figs["objects"]["simulation"]
        c = sim.get("compaction_per_day")
        comp = (
            f"compaction PUT {n0(c['PUT'] + c['POST'])}, GET {n0(c['GET'])}, LIST "
            f"{n0(c['LIST'])} (DELETE {n0(c['DELETE'])})"
            if c
            else "compaction: no whole hour simulated"
        )
        if sim["stuck"]:
            comp += (
                f" over hours {sim['window_h'][0]} to {sim['window_h'][1]}; then **a pass "
                f"never ended**: {sim['stuck']}"
            )
        lines.append(
            "| a day at 1,000 changes/s | uploader: `rrb` to moto at 1,000 distinct-key "
            "changes/s, requests counted in moto's log, times a day; compaction: a simulated "
            + (f"what-if (FAN_IN {sim['fan_in_what_if']}) " if sim["fan_in_what_if"] else "")
            + f"{sim['simulated_days']} days (see below), last day | uploader PUT "
            f"**{n0(m['PUT_per_day'])}**/day, GET {n0(m['GET_per_day'])}, LIST "
            f"{n0(m['LIST_per_day'])}; {comp}; at most **{peak_objects(sim):,} objects** "
            f"| reported |"
        )
    out = ["```console", "$ .venv/bin/python -m bench.compaction --runs 3 --json out.json", "```"]
    out += ["", *lines, "", f"Median of {runs} runs where a figure has runs."]
    if "rows" in figs.get("cost", {}):
        cost = figs["cost"]
        out += [
            "",
            f"Cost per month ({MONTH_DAYS} days) at S3 Standard prices: PUT, COPY, POST and LIST "
            f"${PRICES['put_per_1000']} per 1,000, GET ${PRICES['get_per_1000']} per 1,000, "
            f"${PRICES['gb_month']} per GB-month (GB = 2^30 bytes), DELETE free; "
            f"{report['args']['keys']} keys.",
            "",
            "| changes/s | segments: uploader PUT/day | compaction PUT+LIST/day | GET/day | "
            "stored GiB | segments $/month | keys layout PUT/day | keys GiB | keys $/month |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cost["rows"]:
            if "error" in r:
                out.append(f"| {r['rate']:,} | {r['error']} ||||||||")
                continue
            mark = " (a)" if r["stuck"] else ""
            out.append(
                f"| {r['rate']:,}{mark} | {n0(r['uploader_put_per_day'])} | "
                f"{n0(r['compaction_put_per_day'] + r['compaction_list_per_day'])} | "
                f"{n0(r['uploader_get_per_day'] + r['compaction_get_per_day'])} | "
                f"{r['segments_gib']:.2f} | **${r['segments_usd']:,.2f}** | "
                f"{n0(r['keys_put_per_day'])} | {r['keys_gib']:.2f} | "
                f"**${r['keys_usd']:,.2f}** |"
            )
        if any(r.get("stuck") for r in cost["rows"]):
            out += [
                "",
                "(a) a compaction pass at this rate never ended (the simulation's `stuck` says "
                "how): the requests are those of the last whole simulated day before it, and "
                "when that was the first day (no snapshot yet) the storage is 1.5x what it "
                "ended holding.",
            ]
    return "\n".join(out)


# --- driver -----------------------------------------------------------------------------------

NAMES = ("restore_s3", "compaction", "objects", "cost")


def in_workdir(name: str, fn: Callable[[Path], Any]) -> Any:
    work = Path(tempfile.mkdtemp(prefix=f"rrb-bench-compact-{name}-"))
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--only",
        nargs="+",
        default=list(NAMES),
        help=f"figures to measure, of {', '.join(NAMES)}; commas work too",
    )
    p.add_argument("--json", type=Path, help="write the runs and medians here")
    p.add_argument("--markdown", type=Path, help="write the README section here")
    p.add_argument("--keys", type=int, default=1_000_000, help="keys (restore, compaction, sim)")
    p.add_argument("--generations", type=int, default=GENERATIONS)
    p.add_argument(
        "--compaction-storage",
        default="fs,s3",
        help="where the compaction figure runs: fs, s3 or both (fs,s3)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="uploader load at 1,000/s")
    p.add_argument("--cost-seconds", type=float, default=30.0, help="uploader load, other rates")
    p.add_argument("--rates", default="10,100,1000,10000", help="changes/s of the cost table")
    p.add_argument("--keys-rate", type=int, default=1000, help="keys layout load (changes/s)")
    p.add_argument("--sim-days", type=float, default=3.03, help="simulated days")
    p.add_argument("--sim-records", type=int, default=10, help="records per simulated segment")
    p.add_argument(
        "--sim-fan-in",
        type=int,
        help="a what-if, not the product: the compactor's FAN_IN replaced in the simulation",
    )
    args = p.parse_args()
    configure(quiet=True)  # the in-process storage clients' logs
    args.rates = [int(r) for r in str(args.rates).split(",") if r]
    where = [w for w in args.compaction_storage.split(",") if w]
    if not set(where) <= {"fs", "s3"}:
        p.error("--compaction-storage takes fs, s3 or fs,s3")
    only: list[str] = []
    for item in args.only:
        for name in item.split(","):
            if name in NAMES:
                only.append(name)
            elif name:
                p.error(f"unknown figure {name!r}")
    shared = Path(tempfile.mkdtemp(prefix="rrb-bench-compact-data-"))
    uploads = Path(tempfile.mkdtemp(prefix="rrb-bench-compact-uploads-"))
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "restore_s3": lambda: with_medians(
            in_workdir("restore-s3", lambda w: restore_s3_runs(w, shared, args.keys, args.runs))
        ),
        "compaction": lambda: (
            with_medians(
                in_workdir(
                    "compaction",
                    lambda w: compaction_runs(
                        w, shared, args.keys, args.generations, args.runs, where
                    ),
                )
            )
            | {"where": where}
        ),
        "objects": lambda: objects_figure(uploads, args),
        "cost": lambda: cost_figure(uploads, args),
    }
    report: dict[str, Any] = {
        "args": {k: v if isinstance(v, int | float) else str(v) for k, v in vars(args).items()},
        "code_at_start": code_state(),
        "figures": {},
    }
    rows: list[dict[str, Any]] = []
    try:
        for name in dict.fromkeys(only):
            started = time.perf_counter()
            print(f"{name}:", flush=True)
            try:
                result = benches[name]()
            except Exception as exc:
                print(f"  {name} FAILED: {exc!r}", flush=True)
                report["figures"][name] = {"error": repr(exc)}
                rows.append(
                    {"what": name, "measured": "FAILED", "baseline": "-", "ratio": "-",
                     "target": "-", "met": "NO"}
                )  # fmt: skip
                continue
            result["seconds"] = round(time.perf_counter() - started, 1)
            report["figures"][name] = result
            if "median" in result:
                print(f"  {name} median: {json.dumps(rounded(result['median']))}", flush=True)
            rows += rows_for(name, result)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(uploads, ignore_errors=True)
    report["table"] = rows
    report["code_at_end"] = code_state()
    report["markdown"] = markdown(report)
    print()
    if report["code_at_end"] != report["code_at_start"]:
        print(f"WARNING: the code changed during the run: {report['code_at_start']} -> "
              f"{report['code_at_end']}")  # fmt: skip
    print(f"median of {args.runs} run(s) each, code {report['code_at_start']['commit']}")
    print(table(rows))
    print()
    print(report["markdown"])
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown is not None:
        args.markdown.write_text(report["markdown"] + "\n")


def with_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": runs, "median": medians(runs)}


if __name__ == "__main__":
    main()
