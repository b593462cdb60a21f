"""Segment-layout benchmarks: PUTs per change, end-to-end lag, bulk backup, restore, memory,
one large value.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.segments                       # everything, median of 3 runs
    .venv/bin/python -m bench.segments --runs 5 --only bulk restore_fs --json out.json
    .venv/bin/python -m bench.segments --runs 1 --seconds 10 --bulk-keys 20000 \\
        --restore-keys 20000 --memory-keys 50000             # a quick trial

Every figure is a median over ``--runs`` runs; each baseline is measured in the same run on
the same machine. Commands run as their own processes (``rrb``, ``rrb-restore``), each ended
in a ``finally`` by its own handle; every server listens on 127.0.0.1 only.

==========  ==================================================================  ==========
puts        ``rrb`` (default layout) to a moto S3 server, 1,000 distinct-key     <= 1/100
            changes/s for ``--seconds``: PUT requests per change, counted from   (moonshot
            the objects the server holds (a multipart upload counts its parts    1/1000)
            + 2) and from rrb's ``rrb_storage_call_seconds_count{op="put"}``.
            Baseline: one PUT per change (what the keys layout does).
lag         ``rrb`` to a folder at 1,000 changes/s: client write time of a       p99 <= 2 s
            sample of keys to the first segment file holding them (polled
            every 10 ms), and rrb's own ``rrb_upload_lag_seconds`` histogram
            (source read to storage confirmed, flush included).
bulk        backup of ``--bulk-keys`` existing keys to a folder: ``rrb`` start  <= 4x
            to drained (every entry acked, every key in a segment) vs a raw      (moonshot
            SCAN + pipelined DUMP/PEXPIRETIME loop appending to one file,         1.5x)
            fsynced at the end.
restore_fs  ``rrb-restore`` of ``--restore-keys`` 64-byte strings from a folder  >= 100k
            of segments (10,000 records each, SCAN order), start to exit, vs     keys/s and
            ``redis-cli --pipe`` of the same RESTORE commands; peak RSS.         <= 8x pipe
restore_s3  the same segments in moto S3: ``rrb-restore -c 8`` vs downloading    (reported)
            every object with 8 concurrent GETs plus the pipe.
memory      (a) ``rrb`` peak RSS at 5,000 changes/s over 100k keys for           < 150 MB
            ``--seconds``; (b) ``rrb-restore`` peak RSS restoring                < 200 MB
            ``--memory-keys`` keys from a folder of segments.
large       one random string of ``--large-mb`` MiB, to a folder and to moto     <= +2x the
            S3: ``rrb`` peak RSS over its idle RSS, and ``rrb-restore`` peak     value +
            RSS over its ``--dry-run``'s (memory runs). Redis sends a DUMP and    64 MB
            takes a RESTORE whole, so one copy is the floor; reading the reply
            holds two for a moment.
==========  ==================================================================  ==========
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.common import median, percentile, rss_mb
from bench.common import redis as start_redis
from bench.restore import raw_gets, redis_cli_pipe, start_moto
from rrb_streams.format import builder, segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire import resp
from rrb_streams.wire.keys import OwnKeys
from tests.support.moto import boto_client
from tests.support.moto import s3_env as moto_env
from tests.support.pipeline import drained
from tests.support.proc import BIN, Command
from tests.support.servers import RedisServer, child_env, free_port
from tests.support.wait import wait_for

OWN = OwnKeys()
VALUE = b"v" * 64
BUCKET = "rrb-bench-segments"
S3_CONCURRENCY = 8
PER_SEGMENT = 10_000
SAMPLE_EVERY = 10  # lag: one key in this many carries its write time


# --- metrics -------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of rrb's /metrics, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def histogram_delta(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) buckets observed between two scrapes."""
    out = []
    for (n, labels), value in after.items():
        if n != f"{name}_bucket":
            continue
        le = dict(labels)["le"]
        out.append((float(le), value - before.get((n, labels), 0.0)))
    return sorted(out)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' estimate: linear inside the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def histogram_bounds(buckets: list[tuple[float, float]], q: float) -> tuple[float, float] | None:
    """The (lower, upper) bounds of the bucket holding the q-quantile: all a histogram knows.
    Interpolating inside a wide bucket (1 s to 2.5 s) can say 2.3 s when every observation
    in it was 1.1 s."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower = 0.0
    for le, count in buckets:
        if count >= rank:
            return lower, le
        lower = le
    return lower, float("inf")


def histogram_share_above(buckets: list[tuple[float, float]], bound: float) -> float | None:
    """Share of the observations above ``bound`` (which must be a bucket boundary)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    for le, count in buckets:
        if le == bound:
            return 1 - count / buckets[-1][1]
    raise ValueError(f"{bound} is no bucket boundary")


# --- processes -----------------------------------------------------------------------------


class Rrb:
    """``rrb`` as a child process with its metrics on 127.0.0.1; ended by :meth:`stop`."""

    def __init__(self, work: Path, source: str, storage: str, *args: str, **env: str) -> None:
        self.metrics_port = free_port()
        self.cmd = Command(
            "rrb",
            source,
            "--storage",
            storage,
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            *args,
            log=work / "rrb.log",
            LOG_LEVEL="WARNING",
            **env,
        )

    def start(self) -> Rrb:
        self.cmd.start()
        return self

    @property
    def pid(self) -> int:
        return self.cmd.pid

    def scrape(self) -> Samples:
        return scrape(self.metrics_port)

    def serving(self) -> bool:
        if self.cmd.proc is not None and self.cmd.proc.poll() is not None:
            raise RuntimeError(
                f"rrb exited {self.cmd.proc.returncode}: {self.cmd.output()[-2000:]}"
            )
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when it does not exit in 20 s."""
        if self.cmd.proc is None:
            return
        try:
            self.cmd.terminate(20)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.cmd.ensure_stopped()


def wait_ready(rrb: Rrb, c: redis.Redis) -> None:
    """rrb serves metrics and its bridge made the change stream (and its group)."""
    wait_for(rrb.serving, 60, 0.1)
    wait_for(lambda: c.exists(OWN.stream) == 1 and bool(c.xinfo_groups(OWN.stream)), 60, 0.05)
    time.sleep(1.0)


def wait_drained(c: redis.Redis, timeout: float) -> None:
    """Drained, and still drained 0.3 s later (a rescan or a late event can add entries)."""

    def settled() -> bool:
        if not drained(c):
            return False
        time.sleep(0.3)
        return drained(c)

    wait_for(settled, timeout, 0.1)


def run_to_exit(
    argv: list[str], env: dict[str, str], timeout: float = 1800.0
) -> tuple[float, float, str]:
    """Run a command to its end: (seconds from start to exit, peak RSS MiB, its output).
    Raises when it fails.

    The peak is the child's own VmHWM, sampled every 20 ms until it exits. Not ``ru_maxrss``:
    Linux carries a process's high-water mark across fork and exec, so a child forked from
    this (large) interpreter would report this interpreter's size."""
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    peak = 0.0
    sampled = 0.0
    try:
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                seconds = time.perf_counter() - start
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            now = time.perf_counter()
            if now - sampled >= 0.02:
                sampled = now
                try:
                    peak = max(peak, rss_mb(proc.pid)[1])
                except (OSError, KeyError):  # exiting: a zombie has no memory left
                    pass
            if now - start > timeout:
                raise RuntimeError(f"{argv[0]} still running after {timeout} s")
            time.sleep(0.005)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {text[-3000:]}")
    return seconds, peak, text


def restore_argv(target: RedisServer, storage: str, *args: str) -> list[str]:
    return [str(BIN / "rrb-restore"), target.url(), "--storage", storage, *args]


# --- load ----------------------------------------------------------------------------------


def paced(
    c: redis.Redis,
    rate: int,
    seconds: float,
    key: Callable[[int], bytes],
    on_sent: Callable[[int, int, float], None] | None = None,
) -> tuple[int, float]:
    """SET ``rate`` keys a second for ``seconds`` in 10 ms pipelined slices; ``on_sent(first,
    end, t)`` gets each slice's index range and its send time (``time.time()``, just before
    the pipeline went out). Returns (changes, seconds taken)."""
    per_slice = max(1, rate // 100)
    total = int(rate * seconds)
    start = time.perf_counter()
    i = 0
    while i < total:
        end = min(total, i + per_slice)
        pipe = c.pipeline(transaction=False)
        for j in range(i, end):
            pipe.set(key(j), VALUE)
        sent = time.time()
        pipe.execute()
        if on_sent is not None:
            on_sent(i, end, sent)
        i = end
        ahead = start + i / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return total, time.perf_counter() - start


def fill(c: redis.Redis, n: int, prefix: str = "key") -> None:
    """``n`` keys ``{prefix}:%08d`` of 64 bytes."""
    for start in range(0, n, 10_000):
        pipe = c.pipeline(transaction=False)
        for i in range(start, min(n, start + 10_000)):
            pipe.set(b"%s:%08d" % (prefix.encode(), i), VALUE)
        pipe.execute()


def scan_chunks(c: redis.Redis, size: int) -> Iterator[list[bytes]]:
    """Every key once, in SCAN order, ``size`` at a time."""
    seen: set[bytes] = set()
    chunk: list[bytes] = []
    for key in c.scan_iter(count=1000):
        if key in seen:  # SCAN may return a key twice
            continue
        seen.add(key)
        chunk.append(key)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_records(c: redis.Redis, keys: list[bytes], version: str, stamp: int) -> list[KeyRecord]:
    """What the uploader's Source reads: DUMP, PEXPIRETIME and TYPE per key plus TIME, in one
    transaction; stamps increase from ``stamp`` in read order."""
    pipe = c.pipeline(transaction=True)
    for k in keys:
        pipe.dump(k)
        pipe.execute_command("PEXPIRETIME", k)  # type: ignore[no-untyped-call]
        pipe.type(k)
    pipe.time()
    replies = pipe.execute()
    sec, usec = replies[-1]
    read_at_us = int(sec) * 1_000_000 + int(usec)
    out = []
    for i, k in enumerate(keys):
        dump, expiry, kind = replies[3 * i : 3 * i + 3]
        expire = int(expiry)
        out.append(
            KeyRecord(
                key=k,
                db=0,
                type=kind.decode() if isinstance(kind, bytes) else str(kind),
                expire_at_ms=None if expire < 0 else expire,
                read_at_us=read_at_us,
                entry_id="0-0",
                redis_version=version,
                payload=bytes(dump),
                stamp=stamp + i,
            )
        )
    return out


def make_segments(
    work: Path, n: int, folder: Path, pipe_file: Path | None = None
) -> dict[str, Any]:
    """A folder of segments holding ``n`` 64-byte strings, as an uploader writes them: read
    from a real Redis in SCAN order, ~10,000 records per segment, stamps increasing. With
    ``pipe_file``, also the same keys as ``RESTORE … REPLACE`` commands for redis-cli."""
    src = start_redis(work / "dataset-source")
    started = time.perf_counter()
    segments = stored = 0
    try:
        c = src.client()
        fill(c, n)
        version = str(c.info("server")["redis_version"])
        stamp = time.time_ns() // 1000
        pipe_out = pipe_file.open("wb") if pipe_file is not None else None
        try:
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
                if pipe_out is not None:
                    pipe_out.write(
                        resp.pack(
                            [(b"RESTORE", r.key, b"0", r.payload, b"REPLACE") for r in records]
                        )
                    )
        finally:
            if pipe_out is not None:
                pipe_out.close()
        os.sync()
    finally:
        src.kill()
    return {
        "keys": n,
        "segments": segments,
        "stored_mb": round(stored / 2**20, 2),
        "made_in_s": round(time.perf_counter() - started, 1),
    }


def segment_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.seg") if not p.name.startswith("."))


# --- 1. PUTs per change ---------------------------------------------------------------------


def count_server_puts(endpoint: str) -> dict[str, int]:
    """PUT requests behind the objects the bucket holds: 1 per object, or for a multipart
    upload (ETag ``"…-N"``) its N parts + create + complete."""
    client = boto_client(endpoint)
    objects = segments = puts = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            objects += 1
            segments += obj["Key"].endswith(".seg")
            etag = obj["ETag"].strip('"')
            puts += int(etag.rsplit("-", 1)[1]) + 2 if "-" in etag else 1
    return {"objects": objects, "segment_objects": segments, "server_puts": puts}


def bench_puts(work: Path, seconds: float, rate: int = 1000) -> dict[str, Any]:
    moto, endpoint = start_moto(work)
    server: RedisServer | None = None
    rrb: Rrb | None = None
    try:
        boto_client(endpoint).create_bucket(Bucket=BUCKET)
        server = start_redis(work / "redis")
        c = server.client()
        rrb = Rrb(work, server.url(), f"s3://{BUCKET}/", **moto_env(endpoint)).start()
        wait_ready(rrb, c)
        before = rrb.scrape()
        changes, took = paced(c, rate, seconds, lambda i: b"puts:%d" % i)
        wait_drained(c, 120)
        after = rrb.scrape()
        client_puts = sample(after, "rrb_storage_call_seconds_count", op="put") - sample(
            before, "rrb_storage_call_seconds_count", op="put"
        )
        records = sample(after, "rrb_upload_segment_records_total") - sample(
            before, "rrb_upload_segment_records_total"
        )
        server_counts = count_server_puts(endpoint)
        lag = histogram_delta(before, after, "rrb_upload_lag_seconds")
    finally:
        if rrb is not None:
            rrb.stop()
        if server is not None:
            server.kill()
        moto.kill()
        moto.wait()
    puts = server_counts["server_puts"]
    return {
        "changes": changes,
        "achieved_rate": round(changes / took),
        "puts": puts,
        "rrb_put_calls": int(client_puts),
        "segment_records": int(records),
        **server_counts,
        "puts_per_change": puts / changes,
        "histogram_lag_p99_s": histogram_quantile(lag, 0.99),
        "histogram_lag_p99_bucket": histogram_bounds(lag, 0.99),
        "histogram_share_above_1s": histogram_share_above(lag, 1.0),
        "histogram_share_above_2_5s": histogram_share_above(lag, 2.5),
    }


# --- 2. end-to-end lag ----------------------------------------------------------------------


class SegmentWatcher(threading.Thread):
    """Polls a folder's segments every ``interval`` s; notes when each sampled key first shows
    up in one (``time.time()`` right after the listing that found its file)."""

    def __init__(self, root: Path, wanted: dict[bytes, float], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.root = root / segment.segments_prefix("", 0)
        self.wanted = wanted  # key -> write time, filled in by the writer as it goes
        self.interval = interval
        self.seen: dict[bytes, float] = {}
        self.mtime: dict[bytes, float] = {}
        self.files: set[str] = set()
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.poll()
            except Exception as exc:  # keep polling; report at the end
                self.errors.append(repr(exc))
            self.halt.wait(self.interval)

    def poll(self) -> None:
        try:
            entries = [e for e in os.scandir(self.root) if not e.name.startswith(".")]
        except FileNotFoundError:
            return
        listed = time.time()
        for e in entries:
            if e.name in self.files:
                continue
            self.files.add(e.name)
            mtime = e.stat().st_mtime
            data = Path(e.path).read_bytes()
            _, blocks = segment.decode_segment(data, e.name)
            for records in blocks:
                if isinstance(records, Exception):
                    self.errors.append(repr(records))
                    continue
                for rec in records:
                    if rec.key in self.wanted and rec.key not in self.seen:
                        self.seen[rec.key] = listed
                        self.mtime[rec.key] = mtime


def bench_lag(work: Path, seconds: float, rate: int = 1000) -> dict[str, Any]:
    server = start_redis(work / "redis")
    out = work / "store"
    rrb: Rrb | None = None
    watcher: SegmentWatcher | None = None
    written: dict[bytes, float] = {}
    try:
        c = server.client()
        rrb = Rrb(work, server.url(), str(out)).start()
        wait_ready(rrb, c)
        watcher = SegmentWatcher(out, written)
        watcher.start()
        before = rrb.scrape()

        def key(i: int) -> bytes:
            return b"lag:%d" % i

        def sent(first: int, end: int, t: float) -> None:
            for i in range(first, end):
                if i % SAMPLE_EVERY == 0:
                    written[key(i)] = t

        changes, took = paced(c, rate, seconds, key, sent)
        wait_for(lambda: len(watcher.seen) >= len(written), 120, 0.1)
        wait_drained(c, 60)
        after = rrb.scrape()
    finally:
        if watcher is not None:
            watcher.halt.set()
            watcher.join(10)
        if rrb is not None:
            rrb.stop()
        server.kill()
    lags = [watcher.seen[k] - t for k, t in written.items()]
    file_lags = [watcher.mtime[k] - t for k, t in written.items()]
    hist = histogram_delta(before, after, "rrb_upload_lag_seconds")
    return {
        "changes": changes,
        "achieved_rate": round(changes / took),
        "sampled_keys": len(lags),
        "p50_s": percentile(lags, 0.5),
        "p99_s": percentile(lags, 0.99),
        "max_s": max(lags),
        "file_mtime_p99_s": percentile(file_lags, 0.99),
        "histogram_p50_s": histogram_quantile(hist, 0.5),
        "histogram_p99_s": histogram_quantile(hist, 0.99),
        "histogram_p99_bucket": histogram_bounds(hist, 0.99),
        "histogram_share_above_1s": histogram_share_above(hist, 1.0),
        "histogram_share_above_2_5s": histogram_share_above(hist, 2.5),
        "histogram_count": hist[-1][1] if hist else 0,
        "watcher_errors": len(watcher.errors),
    }


# --- 3. bulk backup -------------------------------------------------------------------------


def raw_backup(c: redis.Redis, path: Path) -> int:
    """The baseline: SCAN, pipelined DUMP + PEXPIRETIME, every key appended to one file,
    fsynced once at the end. Returns the bytes written."""
    written = 0
    with path.open("wb") as f:
        cursor = 0
        while True:
            cursor, keys = c.scan(cursor, count=1000)
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.dump(k)
                pipe.execute_command("PEXPIRETIME", k)  # type: ignore[no-untyped-call]
            res = pipe.execute()
            parts: list[bytes] = []
            for i, key in enumerate(keys):
                k = key if isinstance(key, bytes) else key.encode()
                dump: bytes | None = res[2 * i]
                if dump is None:
                    continue
                parts += (struct.pack(">IqQ", len(k), int(res[2 * i + 1]), len(dump)), k, dump)
            chunk = b"".join(parts)
            f.write(chunk)
            written += len(chunk)
            if cursor == 0:
                break
        f.flush()
        os.fsync(f.fileno())
    return written


def bench_bulk(work: Path, n: int, *, rrb_args: Sequence[str] = ()) -> dict[str, Any]:
    server = start_redis(work / "redis")
    rrb: Rrb | None = None
    try:
        c = server.client()
        fill(c, n)
        os.sync()  # neither side pays for the other's (or the fill's) dirty pages
        t0 = time.perf_counter()
        raw_bytes = raw_backup(c, work / "raw.dump")
        raw = time.perf_counter() - t0
        os.sync()
        out = work / "store"
        rrb = Rrb(work, server.url(), str(out), *rrb_args)
        t0 = time.perf_counter()
        rrb.start()

        def done() -> bool:
            if not drained(c):
                return False
            try:
                s = rrb.scrape()
            except OSError:
                return False
            return sample(s, "rrb_upload_segment_records_total") >= n

        wait_for(done, 900, 0.05)
        ours = time.perf_counter() - t0
        s = rrb.scrape()
    finally:
        if rrb is not None:
            rrb.stop()
        server.kill()
    return {
        "keys": n,
        "raw_s": raw,
        "rrb_s": ours,
        "ratio": ours / raw,
        "raw_mb": raw_bytes / 2**20,
        "segments": int(sample(s, "rrb_upload_segments_total")),
        "segment_records": int(sample(s, "rrb_upload_segment_records_total")),
        "stored_mb": sample(s, "rrb_upload_segment_stored_bytes_total") / 2**20,
    }


# --- 4. and 5. restore ----------------------------------------------------------------------


def restore_once(
    work: Path, name: str, n: int, storage: str, *args: str, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """``rrb-restore`` into a fresh Redis: (seconds start to exit, peak RSS MiB)."""
    target = start_redis(work / name)
    try:
        seconds, peak, _ = run_to_exit(
            restore_argv(target, storage, *args), child_env(LOG_LEVEL="WARNING", **(env or {}))
        )
        with target.client() as t:
            restored = sum(1 for k in t.scan_iter(count=10_000) if not k.startswith(b"rrb:"))
        if restored != n:
            raise RuntimeError(f"rrb-restore restored {restored} keys of {n}")
        return seconds, peak
    finally:
        target.kill()


def pipe_once(work: Path, name: str, n: int, pipe_file: Path) -> float:
    target = start_redis(work / name)
    try:
        seconds = redis_cli_pipe(target.port, pipe_file)
        with target.client() as t:
            if t.dbsize() != n:
                raise RuntimeError(f"redis-cli --pipe loaded {t.dbsize()} keys of {n}")
        return seconds
    finally:
        target.kill()


_DATASETS: dict[int, tuple[Path, Path, dict[str, Any]]] = {}


def restore_dataset(shared: Path, n: int) -> tuple[Path, Path, dict[str, Any]]:
    """(folder of segments, RESTORE commands for redis-cli, its description) of ``n`` keys,
    made once in ``shared`` for every figure that restores them."""
    if n not in _DATASETS:
        work = shared / f"dataset-{n}"
        work.mkdir()
        made = make_segments(work, n, work / "store", work / "restore.resp")
        print(f"  dataset of {n:,} keys: {json.dumps(made)}", flush=True)
        _DATASETS[n] = (work / "store", work / "restore.resp", made)
    return _DATASETS[n]


def restore_fs_runs(work: Path, shared: Path, n: int, runs: int) -> list[dict[str, Any]]:
    folder, pipe_file, made = restore_dataset(shared, n)
    out = []
    for i in range(runs):
        pipe_s = pipe_once(work, f"pipe{i}", n, pipe_file)
        seconds, peak = restore_once(work, f"t{i}", n, str(folder))
        out.append(
            {
                "keys": n,
                "segments": made["segments"],
                "restore_s": seconds,
                "pipe_s": pipe_s,
                "keys_per_s": n / seconds,
                "pipe_keys_per_s": n / pipe_s,
                "ratio": seconds / pipe_s,
                "peak_rss_mb": peak,
            }
        )
        print(f"  restore_fs run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    return out


def restore_s3_runs(work: Path, shared: Path, n: int, runs: int) -> list[dict[str, Any]]:
    folder, pipe_file, _ = restore_dataset(shared, n)
    moto, endpoint = start_moto(work)
    out = []
    try:
        client = boto_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        names = []
        for path in segment_files(folder):
            name = path.relative_to(folder).as_posix()
            client.put_object(Bucket=BUCKET, Key=name, Body=path.read_bytes())
            names.append(name)
        env = moto_env(endpoint)
        for i in range(runs):
            download_s = anyio.run(raw_gets, endpoint, BUCKET, names, S3_CONCURRENCY)
            pipe_s = pipe_once(work, f"pipe{i}", n, pipe_file)
            seconds, peak = restore_once(
                work, f"t{i}", n, f"s3://{BUCKET}/", "-c", str(S3_CONCURRENCY), env=env
            )
            base = download_s + pipe_s
            out.append(
                {
                    "keys": n,
                    "objects": len(names),
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
        moto.kill()
        moto.wait()
    return out


# --- 6. memory ------------------------------------------------------------------------------


def _mem_key(base: int, keys: int, i: int) -> bytes:
    return b"mem:%d" % ((base + i) % keys)


def bench_memory_upload(
    work: Path, seconds: float, rate: int = 5000, keys: int = 100_000
) -> dict[str, Any]:
    server = start_redis(work / "redis")
    rrb: Rrb | None = None
    rss: list[float] = []
    try:
        c = server.client()
        rrb = Rrb(work, server.url(), str(work / "store")).start()
        wait_ready(rrb, c)
        idle = rss_mb(rrb.pid)[0]
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            written, _ = paced(c, rate, 1.0, functools.partial(_mem_key, n, keys))
            n += written
            rss.append(rss_mb(rrb.pid)[0])
        took = time.perf_counter() - start
        backlog = sum(int(g["lag"] or 0) for g in c.xinfo_groups(OWN.stream))
        peak = rss_mb(rrb.pid)[1]
        wait_drained(c, 300)
        after_drain = rss_mb(rrb.pid)
    finally:
        if rrb is not None:
            rrb.stop()
        server.kill()
    tenth = max(1, len(rss) // 10)
    return {
        "changes": n,
        "achieved_rate": round(n / took),
        "idle_mb": idle,
        "early_mb": median(rss[:tenth]),
        "late_mb": median(rss[-tenth:]),
        "peak_mb": max(peak, after_drain[1]),
        "backlog_at_end": backlog,
    }


def memory_restore_runs(work: Path, n: int, runs: int) -> list[dict[str, Any]]:
    folder = work / "store"
    made = make_segments(work, n, folder)
    print(f"  memory_restore dataset: {json.dumps(made)}", flush=True)
    out = []
    for i in range(runs):
        # Baseline: the same command planning only (imports, listing, every footer).
        target = start_redis(work / f"dry{i}")
        try:
            _, dry_peak, _ = run_to_exit(
                restore_argv(target, str(folder), "--dry-run"), child_env(LOG_LEVEL="WARNING")
            )
        finally:
            target.kill()
        seconds, peak = restore_once(work, f"t{i}", n, str(folder))
        out.append(
            {
                "keys": n,
                "segments": made["segments"],
                "peak_rss_mb": peak,
                "dry_run_peak_rss_mb": dry_peak,
                "restore_s": seconds,
                "keys_per_s": n / seconds,
            }
        )
        print(f"  memory_restore run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    return out


# --- 7. one large value ---------------------------------------------------------------------


def bench_large(work: Path, mb: int, where: str) -> dict[str, Any]:
    """One string of ``mb`` MiB (random: nothing compresses it) backed up by ``rrb`` and
    restored by ``rrb-restore``, to a folder or to moto S3: each command's peak RSS against
    its own idle RSS (rrb before the value existed; rrb-restore's ``--dry-run``)."""
    size = mb * 2**20
    moto: subprocess.Popen[bytes] | None = None
    server = start_redis(work / "redis")
    target = start_redis(work / "target")
    rrb: Rrb | None = None
    env: dict[str, str] = {}
    try:
        if where == "s3":
            moto, endpoint = start_moto(work)
            boto_client(endpoint).create_bucket(Bucket=BUCKET)
            env = moto_env(endpoint)
            storage = f"s3://{BUCKET}/"
        else:
            storage = str(work / "store")
        c = server.client()
        for r in (c, target.client()):
            r.config_set("proto-max-bulk-len", str(2 * size + 2**20))
        rrb = running = Rrb(work, server.url(), storage, **env).start()
        wait_ready(running, c)
        idle = rss_mb(running.pid)[0]
        value = os.urandom(size)
        t0 = time.perf_counter()
        c.set(b"large", value)
        del value
        wait_for(
            lambda: sample(running.scrape(), "rrb_upload_segment_records_total") >= 1, 600, 0.05
        )
        backup_s = time.perf_counter() - t0
        backup_peak = rss_mb(rrb.pid)[1]
        rrb.stop()
        rrb = None
        child = child_env(LOG_LEVEL="WARNING", **env)
        _, dry_peak, _ = run_to_exit(restore_argv(target, storage, "--dry-run"), child)
        restore_s, restore_peak, _ = run_to_exit(restore_argv(target, storage), child)
        restored = target.client().strlen(b"large")
        if restored != size:
            raise RuntimeError(f"restored {restored} bytes of {size}")
    finally:
        if rrb is not None:
            rrb.stop()
        server.kill()
        target.kill()
        if moto is not None:
            moto.kill()
            moto.wait()
    return {
        "value_mb": float(mb),
        "backup_s": backup_s,
        "rrb_idle_mb": idle,
        "rrb_peak_mb": backup_peak,
        "restore_s": restore_s,
        "restore_dry_run_mb": dry_peak,
        "restore_peak_mb": restore_peak,
        "rrb_added_x": (backup_peak - idle) / mb,
        "restore_added_x": (restore_peak - dry_peak) / mb,
    }


# --- driver ---------------------------------------------------------------------------------


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out = {}
    for k in keys:
        values = [float(r[k]) for r in runs if isinstance(r.get(k), int | float)]
        if values:
            out[k] = median(values)
    return out


def in_workdir(name: str, fn: Callable[[Path], Any]) -> Any:
    work = Path(tempfile.mkdtemp(prefix=f"rrb-bench-seg-{name}-"))
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def repeated(name: str, runs: int, fn: Callable[[Path], dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i in range(runs):
        out.append(in_workdir(name, fn))
        print(f"  {name} run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    return out


def fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    if unit == "/s":
        return f"{v:,.0f}/s"
    return f"{v:,.{digits}f}{unit}"


def rows_for(name: str, m: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (what, measured, baseline, ratio, target, met) from one figure's medians."""
    if name == "puts":
        ratio = m["puts_per_change"]
        return [
            {
                "what": f"PUTs per change, S3, {m['changes']:,.0f} changes at 1,000/s",
                "measured": f"{m['puts']:,.0f} PUTs (rrb counted {m['rrb_put_calls']:,.0f})",
                "baseline": f"{m['changes']:,.0f} PUTs (1 per change)",
                "ratio": f"{ratio:.5f} (1/{1 / ratio:,.0f})" if ratio else "0",
                "target": "<= 1/100 (moonshot 1/1000)",
                "met": "yes" + (" (moonshot too)" if ratio <= 0.001 else "")
                if ratio <= 0.01
                else "NO",
            }
        ]
    if name == "lag":
        return [
            {
                "what": "lag p50, write to segment file (folder)",
                "measured": fmt(m["p50_s"], " s", 3),
                "baseline": f"rrb histogram p50 {fmt(m['histogram_p50_s'], ' s', 3)}",
                "ratio": "-",
                "target": "-",
                "met": "-",
            },
            {
                "what": "lag p99, write to segment file (folder)",
                "measured": fmt(m["p99_s"], " s", 3),
                "baseline": "rrb histogram: "
                f"{100 * (m.get('histogram_share_above_1s') or 0):.1f}% > 1 s, "
                f"{100 * (m.get('histogram_share_above_2_5s') or 0):.2f}% > 2.5 s "
                f"(interpolated p99 {fmt(m['histogram_p99_s'], ' s', 2)})",
                "ratio": "-",
                "target": "p99 <= 2 s",
                "met": "yes"
                if m["p99_s"] <= 2 and (m.get("histogram_share_above_2_5s") or 0) <= 0.01
                else "NO",
            },
        ]
    if name == "bulk":
        return [
            {
                "what": f"bulk backup of {m['keys']:,.0f} keys to a folder",
                "measured": fmt(m["rrb_s"], " s"),
                "baseline": f"raw loop {fmt(m['raw_s'], ' s')}",
                "ratio": f"{m['ratio']:.2f}x",
                "target": "<= 4x (moonshot 1.5x)",
                "met": "yes" + (" (moonshot too)" if m["ratio"] <= 1.5 else "")
                if m["ratio"] <= 4
                else "NO",
            }
        ]
    if name == "restore_fs":
        return [
            {
                "what": f"restore {m['keys']:,.0f} keys from a folder",
                "measured": f"{fmt(m['keys_per_s'], '/s')} ({fmt(m['restore_s'], ' s')})",
                "baseline": f"redis-cli --pipe {fmt(m['pipe_keys_per_s'], '/s')} "
                f"({fmt(m['pipe_s'], ' s')})",
                "ratio": f"{m['ratio']:.2f}x the pipe's time",
                "target": ">= 100,000 keys/s and <= 8x (moonshot 3x)",
                "met": ("yes" if m["keys_per_s"] >= 100_000 else "NO")
                + " / "
                + ("yes" if m["ratio"] <= 8 else "NO")
                + (" (moonshot)" if m["ratio"] <= 3 else ""),
            },
            {
                "what": f"rrb-restore peak RSS, {m['keys']:,.0f} keys",
                "measured": fmt(m["peak_rss_mb"], " MB", 1),
                "baseline": "-",
                "ratio": "-",
                "target": "-",
                "met": "-",
            },
        ]
    if name == "restore_s3":
        return [
            {
                "what": f"restore {m['keys']:,.0f} keys from moto S3 (-c {S3_CONCURRENCY})",
                "measured": f"{fmt(m['restore_s'], ' s')} ({fmt(m['keys_per_s'], '/s')})",
                "baseline": f"GET all {fmt(m['download_s'], ' s')} + pipe "
                f"{fmt(m['pipe_s'], ' s')} = {fmt(m['baseline_s'], ' s')}",
                "ratio": f"{m['ratio']:.2f}x",
                "target": "(reported)",
                "met": "-",
            }
        ]
    if name == "memory_upload":
        return [
            {
                "what": f"rrb peak RSS, {m['changes']:,.0f} changes at 5,000/s over 100k keys",
                "measured": fmt(m["peak_mb"], " MB", 1),
                "baseline": f"idle {fmt(m['idle_mb'], ' MB', 1)}",
                "ratio": f"{m['peak_mb'] / m['idle_mb']:.2f}x",
                "target": "< 150 MB",
                "met": "yes" if m["peak_mb"] < 150 else "NO",
            }
        ]
    if name == "memory_restore":
        return [
            {
                "what": f"rrb-restore peak RSS, {m['keys']:,.0f} keys from a folder",
                "measured": fmt(m["peak_rss_mb"], " MB", 1),
                "baseline": f"--dry-run {fmt(m['dry_run_peak_rss_mb'], ' MB', 1)}",
                "ratio": f"{m['peak_rss_mb'] / m['dry_run_peak_rss_mb']:.2f}x",
                "target": "< 200 MB",
                "met": "yes" if m["peak_rss_mb"] < 200 else "NO",
            }
        ]
    if name in ("large_fs", "large_s3"):
        where = "a folder" if name == "large_fs" else "moto S3"
        value = m["value_mb"]
        return [
            {
                "what": f"{command} peak RSS, one {value:,.0f} MiB value, {where}",
                "measured": fmt(m[f"{key}_peak_mb"], " MB", 0),
                "baseline": f"{base} {fmt(m[idle], ' MB', 0)}",
                "ratio": f"+{m[f'{key}_added_x']:.2f}x the value",
                "target": "<= +2x the value + 64 MB",
                "met": "yes" if m[f"{key}_peak_mb"] - m[idle] <= 2 * value + 64 else "NO",
            }
            for command, key, base, idle in (
                ("rrb", "rrb", "idle", "rrb_idle_mb"),
                ("rrb-restore", "restore", "--dry-run", "restore_dry_run_mb"),
            )
        ]
    raise ValueError(name)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["what", "measured", "baseline", "ratio", "target", "met"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = " | ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "-+-".join("-" * widths[c] for c in cols)]
    out += [" | ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


NAMES = ("puts", "lag", "bulk", "restore_fs", "restore_s3", "memory", "large")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--only",
        nargs="+",
        default=list(NAMES),
        help=f"figures to measure, of {', '.join(NAMES)} (memory_upload and memory_restore "
        "for half of memory); commas work too",
    )
    p.add_argument("--json", type=Path, help="write the runs and medians here")
    p.add_argument("--seconds", type=float, default=60.0, help="load duration (puts, lag, memory)")
    p.add_argument("--bulk-keys", type=int, default=100_000)
    p.add_argument("--restore-keys", type=int, default=300_000)
    p.add_argument("--memory-keys", type=int, default=1_000_000)
    p.add_argument("--memory-runs", type=int, help="runs of the memory figures (default: --runs)")
    p.add_argument("--large-mb", type=int, default=256, help="size of the large value (MiB)")
    args = p.parse_args()
    only: list[str] = []
    for item in args.only:
        for name in item.split(","):
            if name == "memory":
                only += ["memory_upload", "memory_restore"]
            elif name == "large":
                only += ["large_fs", "large_s3"]
            elif name in (*NAMES, "memory_upload", "memory_restore", "large_fs", "large_s3"):
                only.append(name)
            elif name:
                p.error(f"unknown figure {name!r}")
    runs = args.runs
    mem_runs = args.memory_runs or runs
    shared = Path(tempfile.mkdtemp(prefix="rrb-bench-seg-data-"))  # datasets used twice
    benches: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "puts": lambda: repeated("puts", runs, lambda w: bench_puts(w, args.seconds)),
        "lag": lambda: repeated("lag", runs, lambda w: bench_lag(w, args.seconds)),
        "bulk": lambda: repeated("bulk", runs, lambda w: bench_bulk(w, args.bulk_keys)),
        "restore_fs": lambda: in_workdir(
            "restore-fs", lambda w: restore_fs_runs(w, shared, args.restore_keys, runs)
        ),
        "restore_s3": lambda: in_workdir(
            "restore-s3", lambda w: restore_s3_runs(w, shared, args.restore_keys, runs)
        ),
        "memory_upload": lambda: repeated(
            "memory_upload", mem_runs, lambda w: bench_memory_upload(w, args.seconds)
        ),
        "memory_restore": lambda: in_workdir(
            "memory-restore", lambda w: memory_restore_runs(w, args.memory_keys, mem_runs)
        ),
        "large_fs": lambda: repeated(
            "large_fs", mem_runs, lambda w: bench_large(w, args.large_mb, "fs")
        ),
        "large_s3": lambda: repeated(
            "large_s3", mem_runs, lambda w: bench_large(w, args.large_mb, "s3")
        ),
    }
    try:
        run_all(args, only, benches, runs, mem_runs)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def code_state() -> dict[str, Any]:
    """The commit, and the newest change to the product's files: a run whose code changed
    under it measured two versions."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    newest = max(p.stat().st_mtime for p in (root / "rrb_streams").rglob("*.py"))
    return {"commit": head, "newest_product_change": time.strftime("%H:%M:%S", time.gmtime(newest))}


def run_all(
    args: argparse.Namespace,
    only: list[str],
    benches: dict[str, Callable[[], list[dict[str, Any]]]],
    runs: int,
    mem_runs: int,
) -> None:
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "code_at_start": code_state(),
        "figures": {},
    }
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys(only):
        started = time.perf_counter()
        print(f"{name}:", flush=True)
        try:
            results = benches[name]()
        except Exception as exc:
            print(f"  {name} FAILED: {exc!r}", flush=True)
            report["figures"][name] = {"error": repr(exc)}
            rows.append(
                {"what": name, "measured": "FAILED", "baseline": "-", "ratio": "-",
                 "target": "-", "met": "NO"}
            )  # fmt: skip
            continue
        m = medians(results)
        took = time.perf_counter() - started
        report["figures"][name] = {"median": m, "runs": results, "seconds": round(took, 1)}
        print(f"  {name} median ({took:.0f} s): {json.dumps(rounded(m))}", flush=True)
        rows += rows_for(name, m)
    report["table"] = rows
    report["code_at_end"] = code_state()
    print()
    if report["code_at_end"] != report["code_at_start"]:
        print(f"WARNING: the code changed during the run: {report['code_at_start']} -> "
              f"{report['code_at_end']}")  # fmt: skip
    print(
        f"median of {runs} run(s) each"
        + (f", memory {mem_runs}" if mem_runs != runs else "")
        + f", code {report['code_at_start']['commit']}"
    )
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
