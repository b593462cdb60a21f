"""Redis Cluster benchmarks: backup throughput of a 3-master cluster against one Redis, and how
long the backup takes to resume after a master is killed.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.cluster                        # both figures, median of 3 runs
    .venv/bin/python -m bench.cluster --runs 1 --keys 20000 --only throughput
    .venv/bin/python -m bench.cluster --only takeover --kill data --node-timeout-ms 5000

Every server is a ``redis-server`` on 127.0.0.1 (clusters from :mod:`tests.support.cluster`),
every backup a child process (``rrb``, or ``rrb-bridge`` and ``--uploaders`` ``rrb-upload``
processes) writing segments, the default layout, to a folder. Each is ended by its own pid in
a ``finally``.

**throughput**: in each run, the same backup of the same load, once against a single
``redis-server`` and once against a fresh 3-master cluster (``--replicas`` replicas per
master, default none, so both sides do the same Redis work), in alternating order. Once the
backup is ready (change stream and group made, a consumer joined, PSUBSCRIBE active on every
master), one client writes ``--keys`` distinct keys (64-byte values) in pipelines of 1,000
SETs, as fast as it can: a ``redis.Redis`` pipeline, or a ``RedisCluster`` pipeline that
sends each master its share. From the first write:

- *capture*: until the change stream's ``entries-added`` (XINFO STREAM) grew by ``--keys``,
  polled every 5 ms in a thread: the events the bridge XADDed, per second;
- *backup*: until the stream is drained, i.e. every group has pending 0 and last-delivered-id
  equal to the stream's last-generated-id (in the cluster: ``rrb:{rrb:}changes``, read with a
  cluster client), after capture completed: keys stored per second.

The cluster's figure over the single Redis's is the ratio. Then every key must be in the
backup with the exact DUMP its source master gives (the folder read back with
:func:`tests.support.dataset.latest_records`): an incomplete backup fails the run. CPU over
the timed window, in % of one core, is reported for the backup processes, the Redis servers
and everything else on the machine (other work sharing the 2 cores).

**takeover**: a fresh cluster of 3 masters with one replica each (``--node-timeout-ms``, default
2,000; Redis' own default is 15,000), ``rrb`` backing it up, and a thread writing ``--rate``
SETs a second through a cluster client, cycling over as many keys, so every key of every
master is rewritten each second. First a marker key in a slot of the master about to die is
written and timed into the backup (the steady write-to-stored lag: the baseline). Then
``kill -9`` of a master (t0): one that does not hold rrb's own slot (``--kill data``), or the
one that does, with the change stream (``--kill stream``). Measured from t0:

- (a) *failover*: until the replica answers ROLE master (polled every 10 ms), and until every
  live node agrees on the new owner of all slots with cluster_state ok
  (:meth:`tests.support.cluster.Cluster.problem`);
- (b) *stored*: a marker key in a slot of the new master, written on it with a unique value
  as soon as it accepts writes after the promotion, until a segment file holds a record of it
  with that value (the folder listed, and new segments decoded, every 10 ms);
- (b) - (a), from the promotion: the backup's own takeover time;
- a marker written on a surviving master right after the kill: does the backup of the rest
  of the cluster go on meanwhile? And the longest time without a new segment file around the
  kill (one a second is the steady pace).

The writer keeps writing until every key was rewritten after the failover, then stops; the
backup must drain and equal the cluster exactly (every key, DUMP for DUMP), or the run fails.
rrb runs with ``LOG_LEVEL=INFO``; the warnings and errors it logged are counted by event, and
the gaps (rescans) the bridge saw are reported.

Both figures are medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import redis
import redis.cluster
from redis.crc import key_slot

from bench.common import median
from bench.common import redis as start_redis
from bench.scale import TICK, cpu_ticks, machine_ticks
from bench.segments import Samples, medians, rounded, sample, scrape
from rrb_streams.format import segment
from rrb_streams.storage.fs import FsStorage
from rrb_streams.wire.keys import OwnKeys
from tests.support.cluster import Cluster, ClusterNode
from tests.support.dataset import latest_records
from tests.support.proc import Command
from tests.support.servers import free_port
from tests.support.wait import wait_for

SINGLE = OwnKeys()
CLUSTER = OwnKeys(cluster=True)
VALUE = b"v" * 64
BATCH = 1000  # SETs per pipeline of the load generator
Client = redis.Redis | redis.cluster.RedisCluster


# --- the backup under test --------------------------------------------------------------------


class Backup:
    """One ``rrb`` (``uploaders`` 0), or ``rrb-bridge`` and ``uploaders`` ``rrb-upload``
    processes, backing up ``url`` to ``folder``; each serves metrics on 127.0.0.1."""

    def __init__(
        self, work: Path, url: str, folder: Path, uploaders: int, level: str = "WARNING"
    ) -> None:
        self.log = work / "backup.log"
        storage = ("--storage", str(folder))
        plan: list[tuple[str, tuple[str, ...]]] = [("rrb", storage)]
        if uploaders:
            plan = [("rrb-bridge", ())]
            plan += [("rrb-upload", (*storage, "--consumer", f"up-{i}")) for i in range(uploaders)]
        self.consumers = max(1, uploaders)
        self.ports: list[int] = []
        self.commands: list[Command] = []
        for name, args in plan:
            port = free_port()
            self.ports.append(port)
            metrics = ("--metrics-host", "127.0.0.1", "--metrics-port", str(port))
            self.commands.append(Command(name, url, *args, *metrics, log=self.log, LOG_LEVEL=level))

    def start(self) -> Backup:
        for cmd in self.commands:
            cmd.start()
        return self

    @property
    def pids(self) -> list[int]:
        return [cmd.pid for cmd in self.commands]

    def check_alive(self) -> None:
        for cmd in self.commands:
            if cmd.proc is not None and cmd.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{cmd.name} exited {cmd.proc.returncode}: {tail}")

    def scrape(self) -> Samples:
        """Every process's metrics, summed by name and labels."""
        total: Samples = {}
        for port in self.ports:
            for k, v in scrape(port).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def stop(self) -> None:
        """SIGTERM each, then SIGKILL whatever did not exit in 20 s."""
        for cmd in self.commands:
            if cmd.proc is None:
                continue
            try:
                cmd.terminate(20)
            except subprocess.TimeoutExpired:
                pass
            finally:
                cmd.ensure_stopped()

    def problems(self) -> dict[str, int]:
        """Warnings and errors logged, counted by ``level:event``; lines that are not JSON (a
        traceback) count as ``unparsed``."""
        counts: Counter[str] = Counter()
        if not self.log.exists():
            return {}
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                counts["unparsed"] += 1
                continue
            level = str(entry.get("level", "")).lower()
            if level not in ("debug", "info"):
                counts[f"{level}:{entry.get('event')}"] += 1
        return dict(counts)


def masters_subscribed(clients: list[redis.Redis]) -> bool:
    return all(int(c.execute_command("PUBSUB", "NUMPAT")) > 0 for c in clients)


def ready(c: Client, stream: str, consumers: int, masters: list[redis.Redis]) -> bool:
    """The stream and its group exist, ``consumers`` joined, every master has a subscriber."""
    try:
        if not c.exists(stream):
            return False
        groups = c.xinfo_groups(stream)
        if not groups or len(c.xinfo_consumers(stream, groups[0]["name"])) < consumers:
            return False
        return masters_subscribed(masters)
    except redis.RedisError:
        return False


def drained(c: Client, stream: str) -> bool:
    """Every group of ``stream`` acked all of it (pending 0, last delivered = last id)."""
    try:
        groups = c.xinfo_groups(stream)
        last = c.xinfo_stream(stream)["last-generated-id"]
    except redis.RedisError:
        return False  # a failover under way
    return bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last for g in groups
    )


def cluster_client(cluster: Cluster) -> redis.cluster.RedisCluster:
    node = cluster.live()[0]
    return redis.cluster.RedisCluster(
        host="127.0.0.1", port=node.port, socket_timeout=5, socket_connect_timeout=2
    )


def backed_up(folder: Path) -> dict[bytes, bytes]:
    """Every key's newest DUMP payload in the backup (tombstones left out)."""

    async def read() -> dict[bytes, bytes]:
        storage = FsStorage(folder)
        try:
            records = await latest_records(storage)
        finally:
            await storage.close()
        return {key: rec.payload for (_db, key), rec in records.items()}

    return anyio.run(read)


def dumps(c: Client, keys: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for at in range(0, len(keys), BATCH):
        chunk = keys[at : at + BATCH]
        pipe = c.pipeline(transaction=False)
        for k in chunk:
            pipe.dump(k)
        out.update(zip(chunk, pipe.execute(), strict=True))
    return out


def compare(expected: dict[bytes, bytes], got: dict[bytes, bytes]) -> str:
    """How the backup ``got`` differs from the source's ``expected`` DUMPs; "" if equal."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    differ = [k for k in expected if k in got and got[k] != expected[k]]
    if not (missing or extra or differ):
        return ""
    return (
        f"missing {len(missing)} {missing[:3]}, extra {len(extra)} {extra[:3]}, "
        f"different {len(differ)} {differ[:3]} (of {len(expected)} keys)"
    )


# --- 1. throughput: the cluster vs one Redis ----------------------------------------------------


class AddedWatcher(threading.Thread):
    """Polls the stream's ``entries-added`` every 5 ms with its own client; notes when it
    first reached ``target``."""

    def __init__(self, connect: Callable[[], Client], stream: str, target: int) -> None:
        super().__init__(daemon=True)
        self.client = connect()
        self.stream = stream
        self.target = target
        self.reached: float | None = None
        self.halt = threading.Event()
        self.errors: list[str] = []

    def added(self) -> int:
        return int(self.client.xinfo_stream(self.stream)["entries-added"])

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                try:
                    if self.added() >= self.target:
                        self.reached = time.perf_counter()
                        return
                except redis.RedisError as exc:
                    self.errors.append(repr(exc))
                self.halt.wait(0.005)
        finally:
            self.client.close()


def load(c: Client, keys: list[bytes]) -> None:
    """The load generator: pipelines of ``BATCH`` SETs, back to back."""
    for at in range(0, len(keys), BATCH):
        pipe = c.pipeline(transaction=False)
        for k in keys[at : at + BATCH]:
            pipe.set(k, VALUE)
        pipe.execute()


def measure_throughput(
    work: Path,
    connect: Callable[[], Client],
    masters: list[redis.Redis],
    redis_pids: list[int],
    url: str,
    stream: str,
    n: int,
    uploaders: int,
) -> dict[str, Any]:
    """Back up ``n`` keys written to ``url`` (see the module docstring); the figures."""
    folder = work / "store"
    backup = Backup(work, url, folder, uploaders)
    watcher: AddedWatcher | None = None
    c = connect()
    try:
        backup.start()

        def up() -> bool:
            backup.check_alive()
            return ready(c, stream, backup.consumers, masters)

        wait_for(up, 60, 0.05)
        time.sleep(1.0)
        keys = [b"k:%08d" % i for i in range(n)]
        base = int(c.xinfo_stream(stream)["entries-added"])
        before = backup.scrape()
        watcher = AddedWatcher(connect, stream, base + n)
        watcher.start()
        ours = [*backup.pids, *redis_pids, os.getpid()]
        cpu_before = [sum(cpu_ticks(p)) for p in ours], machine_ticks()
        t0 = time.perf_counter()
        load(c, keys)
        written = time.perf_counter() - t0
        wait_for(lambda: watcher.reached is not None or not watcher.is_alive(), 600, 0.01)
        if watcher.reached is None:
            raise RuntimeError(f"the stream never grew by {n}: {watcher.errors[-3:]}")
        wait_for(lambda: drained(c, stream), 600, 0.01)
        done = time.perf_counter()
        cpu_after = [sum(cpu_ticks(p)) for p in ours], machine_ticks()
        after = backup.scrape()
        expected = dumps(c, keys)
    finally:
        if watcher is not None:
            watcher.halt.set()
            watcher.join(10)
        backup.stop()
        c.close()
    diff = compare(expected, backed_up(folder))
    if diff:
        raise AssertionError(f"incomplete backup: {diff}")
    seconds = done - t0
    captured = watcher.reached - t0

    def pct(ticks: float) -> float:
        return round(100 * ticks / TICK / seconds, 1)

    used = [a - b for a, b in zip(cpu_after[0], cpu_before[0], strict=True)]
    k = len(backup.pids)
    machine = cpu_after[1][0] - cpu_before[1][0]
    machine_pct = 100 * machine / TICK / seconds
    return {
        "keys": n,
        "write_s": written,
        "writes_per_s": n / written,
        "capture_s": captured,
        "capture_per_s": n / captured,
        "stored_s": seconds,
        "keys_per_s": n / seconds,
        "bridge_events": sample(after, "rrb_bridge_events_total")
        - sample(before, "rrb_bridge_events_total"),
        "rescan_entries": sample(after, "rrb_bridge_rescan_entries_total")
        - sample(before, "rrb_bridge_rescan_entries_total"),
        "segments": sample(after, "rrb_upload_segments_total")
        - sample(before, "rrb_upload_segments_total"),
        "backup_cpu_pct": pct(sum(used[:k])),
        "redis_cpu_pct": pct(sum(used[k:-1])),
        "load_generator_cpu_pct": pct(used[-1]),
        "others_cpu_pct": round(machine_pct - pct(sum(used)), 1),
        "log_problems": backup.problems(),
    }


def throughput_single(work: Path, n: int, uploaders: int) -> dict[str, Any]:
    server = start_redis(work / "redis")
    try:
        assert server.proc is not None
        with server.client() as master:
            return measure_throughput(
                work, server.client, [master], [server.proc.pid], server.url(),
                SINGLE.stream, n, uploaders,
            )  # fmt: skip
    finally:
        server.kill()


def throughput_cluster(work: Path, n: int, uploaders: int, replicas: int) -> dict[str, Any]:
    cluster = Cluster(work / "cluster")
    masters: list[redis.Redis] = []
    try:
        cluster.start(masters=3, replicas_per_master=replicas)
        masters = [m.client() for m in cluster.masters()]
        pids = [node.proc.pid for node in cluster.nodes if node.proc is not None]
        return measure_throughput(
            work, lambda: cluster_client(cluster), masters, pids, cluster.url(),
            CLUSTER.stream, n, uploaders,
        )  # fmt: skip
    finally:
        for m in masters:
            m.close()
        cluster.close()


def bench_throughput(
    work: Path, n: int, uploaders: int, replicas: int, cluster_first: bool
) -> dict[str, Any]:
    """Both sides, in the given order; the ratios of the cluster's figures over the single's."""
    sides: dict[str, Callable[[], dict[str, Any]]] = {
        "single": lambda: throughput_single(work / "single", n, uploaders),
        "cluster": lambda: throughput_cluster(work / "cluster", n, uploaders, replicas),
    }
    out: dict[str, Any] = {}
    for name in ("cluster", "single") if cluster_first else ("single", "cluster"):
        (work / name).mkdir()
        out[name] = sides[name]()
    out["ratio"] = out["cluster"]["keys_per_s"] / out["single"]["keys_per_s"]
    out["capture_ratio"] = out["cluster"]["capture_per_s"] / out["single"]["capture_per_s"]
    return out


# --- 2. takeover after a master is killed ---------------------------------------------------------


class PacedWriter(threading.Thread):
    """SETs at ``rate`` a second through a cluster client, in 10 ms pipelined slices, cycling
    over ``rate`` keys. A refused slice is sent again by a fresh client after 50 ms; after a
    stall the schedule starts over rather than bursting to catch up."""

    def __init__(self, cluster: Cluster, rate: int) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.rate = rate
        self.writes = 0
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        per_slice = max(1, self.rate // 100)
        c: redis.cluster.RedisCluster | None = None
        i = 0
        next_at = time.perf_counter()
        while not self.halt.is_set():
            try:
                if c is None:
                    c = cluster_client(self.cluster)
                pipe = c.pipeline(transaction=False)
                for j in range(i, i + per_slice):
                    pipe.set(b"w:%d" % (j % self.rate), b"%d" % j)
                pipe.execute()
            except (redis.RedisError, OSError, IndexError):
                self.errors += 1
                if c is not None:
                    c.close()
                    c = None
                self.halt.wait(0.05)
                continue
            i += per_slice
            self.writes += per_slice
            next_at += 0.01
            ahead = next_at - time.perf_counter()
            if ahead > 0:
                self.halt.wait(ahead)
            elif ahead < -1.0:
                next_at = time.perf_counter()
        if c is not None:
            c.close()


class MarkerWatcher(threading.Thread):
    """Lists the folder's level-0 segments every 10 ms and decodes each new one; notes when
    a record of each wanted key holding its unique value first shows up (``perf_counter``
    right after the listing that found it)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.dir = folder / segment.segments_prefix("", 0)
        self.wanted: dict[bytes, bytes] = {}
        self.seen: dict[bytes, float] = {}
        self.files: set[str] = set()
        self.found: list[float] = []  # when each new segment was first listed
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.errors: list[str] = []

    def want(self, key: bytes, value: bytes) -> None:
        """Watch for ``key`` holding ``value``: call before writing it. The value is at most
        20 bytes and not a number, so Redis stores it as is in the DUMP payload."""
        assert len(value) <= 20 and not value.isdigit()
        with self.lock:
            self.wanted[key] = value

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.poll()
            except Exception as exc:  # keep polling; reported at the end
                self.errors.append(repr(exc))
            self.halt.wait(0.01)

    def poll(self) -> None:
        try:
            entries = [e for e in os.scandir(self.dir) if not e.name.startswith(".")]
        except FileNotFoundError:
            return
        listed = time.perf_counter()
        with self.lock:
            wanted = dict(self.wanted)
        for e in entries:
            if e.name in self.files:
                continue
            self.files.add(e.name)
            self.found.append(listed)
            _, blocks = segment.decode_segment(Path(e.path).read_bytes(), e.name)
            for records in blocks:
                if isinstance(records, Exception):
                    self.errors.append(repr(records))
                    continue
                for rec in records:
                    value = wanted.get(rec.key)
                    if value is not None and rec.key not in self.seen and value in rec.payload:
                        self.seen[rec.key] = listed

    def wait(self, key: bytes, timeout: float) -> float:
        """When ``key`` was first seen stored (waits up to ``timeout`` s)."""
        wait_for(lambda: key in self.seen, timeout, 0.005)
        return self.seen[key]


def key_on(cluster: Cluster, master: ClusterNode, tag: str) -> bytes:
    """A fresh key whose slot ``master`` serves."""
    ranges = [(a, b) for a, b, owner in cluster.live()[0].slot_view() if owner == master.node_id()]
    for j in range(100_000):
        key = b"marker:%s:%d" % (tag.encode(), j)
        slot = key_slot(key)
        if any(a <= slot <= b for a, b in ranges):
            return key
    raise RuntimeError(f"no key found for {master}")


def unique_value() -> bytes:
    return b"m-" + secrets.token_hex(8).encode()  # 18 bytes, never a number


def write_until_accepted(node: ClusterNode, key: bytes, value: bytes, timeout: float) -> float:
    """SET on ``node`` itself, again every 5 ms while it refuses (not yet owner, loading);
    the ``perf_counter`` once it accepted."""
    deadline = time.perf_counter() + timeout
    with node.client() as c:
        while True:
            try:
                c.set(key, value)
                return time.perf_counter()
            except redis.RedisError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.005)


def cluster_dumps(cluster: Cluster) -> dict[bytes, bytes]:
    """Every key of every master but rrb's own, with its DUMP."""
    out: dict[bytes, bytes] = {}
    for master in cluster.masters():
        with master.client() as c:
            keys = [k for k in c.scan_iter(count=1000) if not CLUSTER.is_own(k)]
            out.update(dumps(c, keys))
    return out


def bench_takeover(
    work: Path, kill: str, rate: int, node_timeout_ms: int, uploaders: int
) -> dict[str, Any]:
    cluster = Cluster(work / "cluster")
    folder = work / "store"
    backup: Backup | None = None
    writer: PacedWriter | None = None
    watcher = MarkerWatcher(folder)
    masters: list[redis.Redis] = []
    stream: redis.cluster.RedisCluster | None = None
    tag = secrets.token_hex(4)
    try:
        cluster.start(masters=3, replicas_per_master=1, node_timeout_ms=node_timeout_ms)
        masters = [m.client() for m in cluster.masters()]
        backup = Backup(work, cluster.url(), folder, uploaders, level="INFO").start()
        stream = cluster_client(cluster)

        def up() -> bool:
            assert backup is not None and stream is not None
            backup.check_alive()
            return ready(stream, CLUSTER.stream, backup.consumers, masters)

        wait_for(up, 60, 0.05)
        watcher.start()
        writer = PacedWriter(cluster, rate)
        writer.start()
        time.sleep(3.0)

        own_master = cluster.owner(key_slot(CLUSTER.slot_tag))
        others = [m for m in cluster.masters() if m is not own_master]
        victim = own_master if kill == "stream" else others[0]
        survivor = others[-1] if kill == "stream" else others[1]
        (replica,) = cluster.replicas_of(victim)

        steady_key = key_on(cluster, victim, f"{tag}-steady")
        value = unique_value()
        watcher.want(steady_key, value)
        written = write_until_accepted(victim, steady_key, value, 10)
        steady_lag = watcher.wait(steady_key, 60) - written

        marker, survivor_key = key_on(cluster, victim, tag), key_on(cluster, survivor, tag)
        marker_value, survivor_value = unique_value(), unique_value()
        watcher.want(marker, marker_value)
        watcher.want(survivor_key, survivor_value)
        before = backup.scrape()
        cluster.wait_ok()
        writes_before = writer.writes
        t0 = time.perf_counter()
        victim.kill()
        survivor_written = write_until_accepted(survivor, survivor_key, survivor_value, 10)

        def promoted() -> bool:
            try:
                return replica.is_master()
            except redis.RedisError:
                return False

        timeout = 30 + 5 * node_timeout_ms / 1000
        wait_for(promoted, timeout, 0.01)
        t_promoted = time.perf_counter()
        marker_written = write_until_accepted(replica, marker, marker_value, timeout)
        wait_for(lambda: cluster.problem() is None, timeout, 0.02)
        t_agreed = time.perf_counter()
        marker_stored = watcher.wait(marker, 120)
        survivor_stored = watcher.wait(survivor_key, 120)
        # Every key rewritten after the failover: the cluster's final state is then what the
        # writer wrote, whatever the dead master had not passed on to its replica.
        writes_after = writer.writes
        wait_for(lambda: writer is not None and writer.writes >= writes_after + rate + 100, 30)
        writer.halt.set()
        writer.join(30)
        wait_for(lambda: drained(stream, CLUSTER.stream), 120, 0.05)
        after = backup.scrape()
        backup.stop()
        expected = cluster_dumps(cluster)
    finally:
        watcher.halt.set()
        if writer is not None:
            writer.halt.set()
            writer.join(30)
        if backup is not None:
            backup.stop()
        for m in masters:
            m.close()
        if stream is not None:
            stream.close()
        cluster.close()
    if watcher.errors:
        raise RuntimeError(f"reading the segments failed: {watcher.errors[:3]}")
    diff = compare(expected, backed_up(folder))
    if diff:
        raise AssertionError(f"the backup differs from the cluster: {diff}")
    rescans = {
        dict(labels)["reason"]: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == "rrb_bridge_rescans_total"
    }
    return {
        "kill": kill,
        "node_timeout_ms": node_timeout_ms,
        "steady_lag_s": steady_lag,
        "promoted_s": t_promoted - t0,
        "agreed_s": t_agreed - t0,
        "marker_written_s": marker_written - t0,
        "marker_stored_s": marker_stored - t0,
        "takeover_s": marker_stored - t_promoted,
        "marker_lag_s": marker_stored - marker_written,
        "survivor_written_s": survivor_written - t0,
        "survivor_stored_s": survivor_stored - t0,
        # The longest time without a new segment around the kill (one a second is the steady
        # pace): how long storage writes paused, for every master.
        "segment_pause_s": max(
            b - a
            for a, b in itertools.pairwise(sorted(watcher.found))
            if b > t0 and a <= marker_stored
        ),
        "writes": writer.writes if writer is not None else 0,
        "writes_before_kill": writes_before,
        "writer_errors": writer.errors if writer is not None else 0,
        "keys_compared": len(expected),
        "rescans": {k: v for k, v in rescans.items() if v},
        "rescan_entries": sample(after, "rrb_bridge_rescan_entries_total")
        - sample(before, "rrb_bridge_rescan_entries_total"),
        "log_problems": backup.problems() if backup is not None else {},
    }


# --- report -------------------------------------------------------------------------------------


def in_workdir(
    name: str, fn: Callable[[Path], dict[str, Any]], keep: bool = False
) -> dict[str, Any]:
    """``fn`` in a fresh folder, removed afterwards unless ``keep`` (logs, node folders)."""
    work = Path(tempfile.mkdtemp(prefix=f"rrb-bench-cluster-{name}-"))
    try:
        return fn(work)
    finally:
        if keep:
            print(f"  kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def spread(runs: list[dict[str, Any]], key: str, digits: int = 2) -> str:
    values = [r[key] for r in runs]
    return f"{min(values):,.{digits}f} to {max(values):,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The figures as rows for the README: what, how measured, result, baseline or ratio."""
    lines = ["| what | how measured | result | baseline, ratio |", "|---|---|---|---|"]
    if report.get("throughput"):
        t = report["throughput"]
        runs = t["runs"]
        s, c = t["median"]["single"], t["median"]["cluster"]
        procs = (
            "one `rrb` process"
            if t["uploaders"] == 0
            else f"`rrb-bridge` + {t['uploaders']} `rrb-upload`"
        )
        cl = f"3 masters{', ' + str(t['replicas']) + ' replica each' if t['replicas'] else ''}"
        lines.append(
            f"| backup throughput, Redis Cluster ({cl}) | {c['keys']:,.0f} distinct keys "
            f"(64-byte values) SET by one client in pipelines of 1,000, as fast as it can; "
            f"{procs} to a folder (segments); first write until the change stream "
            "`rrb:{rrb:}changes` is drained (every group: pending 0, last delivered = last "
            "id); every key then in the backup, DUMP for DUMP | "
            f"**{c['keys_per_s']:,.0f} keys/s** ({c['stored_s']:.1f} s; runs "
            f"{spread([r['cluster'] for r in runs], 'keys_per_s', 0)}); backup processes "
            f"{c['backup_cpu_pct']:.0f}% of a core, Redis {c['redis_cpu_pct']:.0f}% | "
            f"a single Redis, same run and load: {s['keys_per_s']:,.0f} keys/s "
            f"({s['stored_s']:.1f} s; backup {s['backup_cpu_pct']:.0f}% of a core, Redis "
            f"{s['redis_cpu_pct']:.0f}%); **{t['median']['ratio']:.2f}x** |"
        )
        lines.append(
            "| capture rate, Redis Cluster | the same runs: first write until the change "
            "stream's `entries-added` (XINFO STREAM, polled every 5 ms) grew by one entry per "
            f"key | **{c['capture_per_s']:,.0f} events/s** ({c['capture_s']:.2f} s; the "
            f"client wrote {c['writes_per_s']:,.0f} keys/s) | a single Redis: "
            f"{s['capture_per_s']:,.0f} events/s (client {s['writes_per_s']:,.0f} keys/s); "
            f"**{t['median']['capture_ratio']:.2f}x** |"
        )
    for kill, fig in report.get("takeover", {}).items():
        m, runs = fig["median"], fig["runs"]
        who = (
            "the master holding rrb's own slot (the change stream)"
            if kill == "stream"
            else "a master not holding rrb's own slot"
        )
        how = (
            f"3 masters + 1 replica each, node timeout {m['node_timeout_ms']:,.0f} ms, `rrb` "
            f"to a folder under {fig['rate']:,} SETs/s over keys of every master; `kill -9` of "
            f"{who}"
        )
        lines.append(
            f"| failover, {kill} master killed | {how}: until its replica answers ROLE master; "
            f"until every node agrees (cluster_state ok, all slots served) | "
            f"**{m['promoted_s']:.2f} s** (runs {spread(runs, 'promoted_s')}); all agree "
            f"{m['agreed_s']:.2f} s | Redis' own: node timeout + election |"
        )
        lines.append(
            f"| backup takeover, {kill} master killed | the same: kill until a marker written "
            "to the new master right after its promotion (unique value) is in a segment file, "
            "folder polled every 10 ms; minus the failover (ROLE master) | "
            f"**{m['marker_stored_s']:.2f} s** after the kill (runs "
            f"{spread(runs, 'marker_stored_s')}), **{m['takeover_s']:.2f} s** after the "
            f"promotion (runs {spread(runs, 'takeover_s')}); a write on a surviving master "
            f"right after the kill: stored {m['survivor_stored_s']:.2f} s after it; no new "
            f"segment for {m['segment_pause_s']:.2f} s | "
            f"steady write-to-stored lag before the kill: {m['steady_lag_s']:.2f} s; "
            f"takeover {m['takeover_s'] / m['steady_lag_s']:.1f}x that |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="throughput,takeover", help="throughput and/or takeover")
    p.add_argument("--keys", type=int, default=100_000, help="throughput: keys written")
    p.add_argument(
        "--replicas", type=int, default=0, help="throughput: replicas per cluster master"
    )
    p.add_argument(
        "--uploaders",
        type=int,
        default=0,
        help="0: one rrb process; N: rrb-bridge and N rrb-upload processes",
    )
    p.add_argument("--kill", default="data,stream", help="takeover: data and/or stream")
    p.add_argument("--rate", type=int, default=1000, help="takeover: SETs a second")
    p.add_argument(
        "--node-timeout-ms", type=int, default=2000, help="takeover: cluster-node-timeout"
    )
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (logs, data)")
    args = p.parse_args()
    only = set(args.only.split(","))
    report: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}, "takeover": {}}
    started = time.perf_counter()
    if "throughput" in only:
        runs = []
        for i in range(args.runs):

            def one(work: Path, first: bool = i % 2 == 1) -> dict[str, Any]:
                return bench_throughput(work, args.keys, args.uploaders, args.replicas, first)

            runs.append(in_workdir("throughput", one, args.keep))
            r = runs[-1]
            brief = {side: rounded(r[side]) for side in ("single", "cluster")}
            print(f"throughput run {i + 1}: ratio {r['ratio']:.3f}, capture ratio "
                  f"{r['capture_ratio']:.3f} {json.dumps(brief)}", flush=True)  # fmt: skip
        report["throughput"] = {
            "runs": runs,
            "uploaders": args.uploaders,
            "replicas": args.replicas,
            "median": {
                "single": medians([r["single"] for r in runs]),
                "cluster": medians([r["cluster"] for r in runs]),
                "ratio": median([r["ratio"] for r in runs]),
                "capture_ratio": median([r["capture_ratio"] for r in runs]),
            },
        }
        print(f"throughput median: {json.dumps(rounded(report['throughput']['median']['cluster']))}"
              f" ratio {report['throughput']['median']['ratio']:.3f}", flush=True)  # fmt: skip
    if "takeover" in only:
        for kill in args.kill.split(","):
            runs = []
            for i in range(args.runs):

                def one(work: Path, kill: str = kill) -> dict[str, Any]:
                    return bench_takeover(
                        work, kill, args.rate, args.node_timeout_ms, args.uploaders
                    )

                runs.append(in_workdir(f"takeover-{kill}", one, args.keep))
                print(f"takeover {kill} run {i + 1}: {json.dumps(rounded(runs[-1]))}", flush=True)
            report["takeover"][kill] = {"runs": runs, "rate": args.rate, "median": medians(runs)}
            print(f"takeover {kill} median: {json.dumps(rounded(medians(runs)))}", flush=True)
    print(f"\n{os.cpu_count()} cores, median of {args.runs} run(s), "
          f"{time.perf_counter() - started:.0f} s in all\n")  # fmt: skip
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
