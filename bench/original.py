"""Side by side: the original ``realtime-redis-backup`` 0.0.1 (PyPI) against rrb-streams, on
the original tool's own workload.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.original                       # 10,000 keys, median of 3 runs
    .venv/bin/python -m bench.original --keys 10000 --runs 1 --json /tmp/original.json
    .venv/bin/python -m bench.original --layout keys         # passed to rrb if it has --layout

Not part of the test suite. The original runs in its own Python 3.11 virtualenv, made on
first use with pip and reused afterwards (``--original-venv``, default
``/tmp/rrb-original-venv``), with package versions of its time: see ``ORIGINAL_PINS``. It
declares no dependencies, so they are pinned here, and it imports ``aioredis_watchdog`` (its
author's package), which its ``requirements.txt`` lists.

The workload is the original's ``examples/data_producer.py``: ``SET users:profile:user-N
<uuid4 hex>`` for N below ``--keys``, here in pipelines of 1,000 rather than one at a time.
Each run, for each tool (the order alternates from run to run):

1. a fresh ``redis-server`` and a fresh moto S3 server (``ThreadedMotoServer``, in this
   process, on a free loopback port);
2. the tool's backup command is started with 2 concurrent uploads (``-c 2``) and waited for
   until it is ready: subscribed to keyspace events (each tool turns notifications on itself,
   as it does in production), and for rrb its consumer group made;
3. **drain**: the clock starts with the first write and stops at the first moment storage
   holds every key's latest state, confirmed by that state then holding still for 1 s
   (not counted):

   - original: objects in its bucket equal the number of keys. It writes one object per key
     (``sha256(key).backup``) to the bucket ``redis-backup``, whatever ``S3_BUCKET`` says;
   - rrb: the change stream is drained: every group has nothing pending and has been
     delivered the stream's last entry, and the bridge added an entry for every write;

4. the backup command is stopped, and **restore**: the tool's restore command (``rrb-restore``
   for both, each its own) into a fresh Redis, ``-c 2``, timed from start to exit;
5. **exactness**: every source key is read back from the restored Redis and compared with the
   value written; a key counts as exact only when its value is byte for byte the same.

Reported per tool: drain seconds, restore seconds, exact keys restored, and the ratio
original / ours of each time. Medians over ``--runs``. Also shown: the objects in the bucket
and the keys in the restored Redis (our own ``rrb:`` keys left out).

``--layout`` is passed to our ``rrb`` when it has that option (``segments`` puts many keys'
records in one object, so there are far fewer objects than keys); an ``rrb`` without it
stores one object per key, reported as layout ``keys``. With one object per key, both tools
make one PUT per key and one GET per key to restore, so moto's own request rate (a few hundred
a second on 2 cores) bounds both times.

How the original is driven (from its README and its code): ``rrb -c 2 REDIS_URL`` and
``rrb-restore -c 2 REDIS_URL``, with ``S3_SERVER`` (the endpoint, passed to aiobotocore as
``endpoint_url``), ``S3_ACCESS_KEY`` and ``S3_SECRET_KEY`` in the environment; the bucket must
exist (it checks it with GetBucketAcl at start). ``AWS_DEFAULT_REGION`` is set too, for
botocore. Ours: ``rrb REDIS_URL --storage s3://BUCKET/ --concurrency 2`` and ``rrb-restore
REDIS_URL --storage s3://BUCKET/ -c 2``, with ``S3_SERVER``, ``S3_ACCESS_KEY``,
``S3_SECRET_KEY`` and ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import redis
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

from bench.common import command, median, terminate
from bench.common import redis as start_redis
from tests.support.servers import RedisServer, child_env, free_port

#: What the original needs, at versions of its time (May 2020). Its wheel declares no
#: dependencies; these are its requirements.txt, including its author's aioredis-watchdog.
ORIGINAL_PINS = (
    "realtime-redis-backup==0.0.1",
    "aioredis==1.3.1",
    "aiobotocore==1.0.7",
    "async-timeout",
    "aioredis-watchdog==0.0.4",
)
ORIGINAL_PYTHON = "python3.11"
ORIGINAL_BUCKET = "redis-backup"  # hard-coded in the original (RunningConfig.s3_bucket)
OURS_BUCKET = "rrb-bench"
OWN_PREFIX = "rrb:"  # our own keys, in the source and the restore target
STREAM = f"{OWN_PREFIX}changes"
CONCURRENCY = 2
ACCESS_KEY = "bench-access"
SECRET_KEY = "bench-secret"
REGION = "us-east-1"
WRITE_BATCH = 1000
STILL_S = 1.0  # how long the drained state must hold before the drain counts as done
POLL_S = 0.02


# --------------------------------------------------------------------------------------------
# The original's virtualenv


def original_venv(root: Path, python: str) -> Path:
    """The ``bin`` directory of a virtualenv with the original installed, made at ``root``
    with ``python`` unless one with the same pins is already there."""
    marker = root / "rrb-bench-pins.txt"
    wanted = "\n".join(ORIGINAL_PINS) + "\n"
    bin_dir = root / "bin"
    if (
        marker.exists()
        and marker.read_text() == wanted
        and (bin_dir / "rrb").exists()
        and (bin_dir / "rrb-restore").exists()
    ):
        return bin_dir
    interpreter = shutil.which(python)
    if interpreter is None:
        raise SystemExit(f"{python} not found: the original needs its own Python (--python)")
    print(f"[*] Making the original's virtualenv in {root} ({python})...", flush=True)
    subprocess.run([interpreter, "-m", "venv", "--clear", str(root)], check=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *ORIGINAL_PINS], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pip could not install the original:\n{done.stdout}{done.stderr}")
    marker.write_text(wanted)
    return bin_dir


def installed_versions(bin_dir: Path) -> dict[str, str]:
    """Name to version of what the original's virtualenv holds."""
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check"]
    listed = [*pip, "list", "--format=json"]
    done = subprocess.run(listed, capture_output=True, text=True, check=True)
    return {p["name"].lower(): p["version"] for p in json.loads(done.stdout)}


# --------------------------------------------------------------------------------------------
# Moto


class Moto:
    """A moto S3 server on a free loopback port; its objects are counted in its backend (no
    listing requests, which would load the server the tools are using)."""

    def __init__(self) -> None:
        # moto's HTTP server logs every request through werkzeug: keep the report readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> Moto:
        self.server.start()
        return self

    def stop(self) -> None:
        """Drop every bucket (moto's state is per process, not per server), then stop."""
        try:
            request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
            urllib.request.urlopen(request, timeout=10).read()
        finally:
            self.server.stop()

    def create_bucket(self, name: str) -> None:
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).create_bucket(Bucket=name)

    def count(self, bucket: str) -> int:
        """Objects in ``bucket`` now."""
        buckets = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets
        return len(buckets[bucket].keys) if bucket in buckets else 0


@contextmanager
def moto_server() -> Iterator[Moto]:
    moto = Moto().start()
    try:
        yield moto
    finally:
        moto.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """What both tools read to reach the moto server."""
    return {
        "S3_SERVER": endpoint,
        "S3_ACCESS_KEY": ACCESS_KEY,
        "S3_SECRET_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


# --------------------------------------------------------------------------------------------
# The tools


@dataclass
class Tool:
    """How to drive one tool: its commands, when it is ready, and when it has drained."""

    name: str
    bucket: str
    backup: Callable[[str], list[str]]  # source URL -> argv
    restore: Callable[[str], list[str]]  # target URL -> argv
    env: Callable[[str], dict[str, str]]  # S3 endpoint -> environment
    ready: Callable[[redis.Redis, Path], bool]  # source client, log -> ready?
    # (source client, moto, keys written) -> (drained?, a state that must then hold still)
    drained: Callable[[redis.Redis, Moto, int], tuple[bool, Hashable]]


def subscribed(c: redis.Redis) -> bool:
    """Whether some client has a keyspace pattern subscription on ``c``."""
    return int(c.pubsub_numpat()) >= 1


def original_tool(bin_dir: Path) -> Tool:
    def env(endpoint: str) -> dict[str, str]:
        # Unbuffered, so its banner reaches the log as it prints it; none of our PYTHONPATH.
        env = child_env(**s3_env(endpoint), PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        return env

    def ready(c: redis.Redis, log: Path) -> bool:
        started = "Starting Realtime Redis Backup service... OK!" in log.read_text(errors="replace")
        return started and subscribed(c)

    def drained(c: redis.Redis, moto: Moto, keys: int) -> tuple[bool, Hashable]:
        stored = moto.count(ORIGINAL_BUCKET)
        return stored >= keys, stored

    return Tool(
        name="original",
        bucket=ORIGINAL_BUCKET,
        backup=lambda url: [str(bin_dir / "rrb"), "-c", str(CONCURRENCY), url],
        restore=lambda url: [str(bin_dir / "rrb-restore"), "-c", str(CONCURRENCY), url],
        env=env,
        ready=ready,
        drained=drained,
    )


def stream_state(c: redis.Redis) -> tuple[bool, str | None, int]:
    """(drained, last entry id, entries ever added) of our change stream on ``c``: drained
    when it has a group and every group has nothing pending and was delivered the last
    entry (as ``tests.support.pipeline.drained``)."""
    try:
        info = c.xinfo_stream(STREAM)
    except redis.ResponseError:
        return False, None, 0
    last = info["last-generated-id"]
    groups = c.xinfo_groups(STREAM)
    done = bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last for g in groups
    )
    added = int(info.get("entries-added", info["length"]))
    return done, last.decode() if isinstance(last, bytes) else str(last), added


def ours_tool(layout: str | None) -> Tool:
    def backup(url: str) -> list[str]:
        argv = command("rrb", url, "--storage", f"s3://{OURS_BUCKET}/")
        argv += ["--concurrency", str(CONCURRENCY)]
        return argv + (["--layout", layout] if layout else [])

    def ready(c: redis.Redis, log: Path) -> bool:
        try:
            groups = c.xinfo_groups(STREAM)
        except redis.ResponseError:
            return False
        return bool(groups) and subscribed(c)

    def drained(c: redis.Redis, moto: Moto, keys: int) -> tuple[bool, Hashable]:
        done, last, added = stream_state(c)
        # The bridge adds one entry per change: every write must be in before it counts.
        return done and added >= keys, last

    return Tool(
        name="ours",
        bucket=OURS_BUCKET,
        backup=backup,
        restore=lambda url: command(
            "rrb-restore", url, "--storage", f"s3://{OURS_BUCKET}/", "-c", str(CONCURRENCY)
        ),
        env=lambda endpoint: child_env(**s3_env(endpoint), LOG_LEVEL="WARNING"),
        ready=ready,
        drained=drained,
    )


def layout_support() -> tuple[bool, str | None]:
    """Whether our ``rrb`` has ``--layout``, and its default if the help says."""
    done = subprocess.run(command("rrb", "--help"), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"rrb --help failed: our rrb cannot start:\n{done.stderr[-2000:]}")
    # The option's own entry in the help: from its line to the next option's.
    entry = re.search(r"^\s+--layout\b.*?(?=^\s+-|\Z)", done.stdout, re.MULTILINE | re.DOTALL)
    if entry is None:
        return False, None
    found = re.search(r"\(default:\s*([\w-]+)\)", entry.group(0))
    return True, found.group(1) if found else None


# --------------------------------------------------------------------------------------------
# One run of one tool


@dataclass
class RunResult:
    tool: str
    write_s: float
    drain_s: float | None  # None: storage did not hold every key within --timeout
    objects: int  # objects in the tool's bucket when the drain ended (or timed out)
    restore_s: float | None  # None: the restore did not finish within --timeout
    restore_exit: int | None
    exact: int  # source keys whose restored value is byte for byte the one written
    target_keys: int  # keys in the restored Redis, our own (rrb:*) left out
    notes: list[str] = field(default_factory=list)


def workload(n: int) -> dict[bytes, bytes]:
    """The original's example producer: ``users:profile:user-N`` -> ``uuid4().hex``."""
    return {f"users:profile:user-{i}".encode(): uuid.uuid4().hex.encode() for i in range(n)}


def write(c: redis.Redis, data: dict[bytes, bytes]) -> None:
    pipe = c.pipeline(transaction=False)
    for i, (key, value) in enumerate(data.items(), 1):
        pipe.set(key, value)
        if i % WRITE_BATCH == 0:
            pipe.execute()
    pipe.execute()


def wait_settled(
    probe: Callable[[], tuple[bool, Hashable]], t0: float, timeout: float
) -> float | None:
    """Seconds from ``t0`` to the first poll at which ``probe`` said done with the state it
    then kept, done, for ``STILL_S``; None after ``timeout`` s."""
    first: float | None = None
    state: Hashable = None
    while True:
        now = time.perf_counter()
        done, seen = probe()
        if not done:
            first = None
        elif first is None or seen != state:
            first, state = now, seen
        elif now - first >= STILL_S:
            return first - t0
        if now - t0 > timeout:
            return None
        time.sleep(POLL_S)


def exact_keys(target: redis.Redis, data: dict[bytes, bytes]) -> tuple[int, int]:
    """(source keys restored with the same value, keys in ``target`` that are not ours)."""
    keys = list(data)
    exact = 0
    for start in range(0, len(keys), WRITE_BATCH):
        chunk = keys[start : start + WRITE_BATCH]
        values = target.mget(chunk)
        exact += sum(1 for k, v in zip(chunk, values, strict=True) if v == data[k])
    own = sum(1 for _ in target.scan_iter(match=f"{OWN_PREFIX}*", count=1000))
    return exact, int(target.dbsize()) - own


def run_restore(
    argv: list[str], env: dict[str, str], log: Path, timeout: float
) -> tuple[float | None, int | None]:
    """Run a restore command to its end: (seconds, exit status); (None, None) if it was still
    running after ``timeout`` s (it is killed)."""
    with log.open("ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
        try:
            code = proc.wait(timeout)
            return time.perf_counter() - start, code
        except subprocess.TimeoutExpired:
            return None, None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_tool(tool: Tool, data: dict[bytes, bytes], work: Path, timeout: float) -> RunResult:
    """One tool, end to end, on fresh servers in ``work``."""
    work.mkdir(parents=True)
    n = len(data)
    source: RedisServer | None = None
    target: RedisServer | None = None
    backup: subprocess.Popen[bytes] | None = None
    with moto_server() as moto:
        try:
            moto.create_bucket(tool.bucket)
            env = tool.env(moto.endpoint)
            source = start_redis(work / "source")
            c = source.client()
            log = work / "backup.log"
            with log.open("ab") as out:
                backup = subprocess.Popen(
                    tool.backup(source.url()), stdout=out, stderr=out, env=env
                )
            deadline = time.monotonic() + 60
            while not tool.ready(c, log):
                if backup.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tool.name} backup did not start:\n{tail(log)}")
                time.sleep(POLL_S)
            time.sleep(0.5)  # both tools: let what they start after subscribing settle

            t0 = time.perf_counter()
            write(c, data)
            write_s = time.perf_counter() - t0
            drain_s = wait_settled(lambda: tool.drained(c, moto, n), t0, timeout)
            objects = moto.count(tool.bucket)
            notes = [] if drain_s is not None else [f"not drained in {timeout:g} s"]
            terminate(backup)

            target = start_redis(work / "target")
            restore_log = work / "restore.log"
            restore_s, code = run_restore(tool.restore(target.url()), env, restore_log, timeout)
            if code is None:
                notes.append(f"restore still running after {timeout:g} s: killed")
            elif code != 0:
                notes.append(f"restore exited {code}: {tail(restore_log, 3)}")
            exact, target_keys = exact_keys(target.client(), data)
            return RunResult(
                tool.name, write_s, drain_s, objects, restore_s, code, exact, target_keys, notes
            )
        finally:
            if backup is not None:
                terminate(backup)
            for server in (source, target):
                if server is not None:
                    server.kill()


# --------------------------------------------------------------------------------------------
# Report


def summary(runs: list[RunResult]) -> dict[str, Any]:
    """Medians of one tool's runs (over the runs that finished, for the times)."""

    def med(values: list[float | None]) -> float | None:
        done = [v for v in values if v is not None]
        return round(median(done), 3) if done else None

    return {
        "write_s": med([r.write_s for r in runs]),
        "drain_s": med([r.drain_s for r in runs]),
        "restore_s": med([r.restore_s for r in runs]),
        "exact": med([float(r.exact) for r in runs]),
        "objects": med([float(r.objects) for r in runs]),
        "target_keys": med([float(r.target_keys) for r in runs]),
        "drain_timeouts": sum(r.drain_s is None for r in runs),
        "restore_failures": sum(r.restore_exit != 0 for r in runs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def table(report: dict[str, Any]) -> str:
    o, u, r = report["original"]["median"], report["ours"]["median"], report["ratio"]
    n = report["keys"]

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def count(v: float | None) -> str:
        return "-" if v is None else f"{int(v):,} / {n:,}"

    def times(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    rows = [
        ("writes (s)", secs(o["write_s"]), secs(u["write_s"]), ""),
        ("backup drain (s)", secs(o["drain_s"]), secs(u["drain_s"]), times(r["drain"])),
        ("objects in bucket", f"{int(o['objects']):,}", f"{int(u['objects']):,}", ""),
        ("restore (s)", secs(o["restore_s"]), secs(u["restore_s"]), times(r["restore"])),
        ("exact keys restored", count(o["exact"]), count(u["exact"]), ""),
        ("keys in restored Redis", f"{int(o['target_keys']):,}", f"{int(u['target_keys']):,}", ""),
    ]
    head = ("", f"original {report['original']['version']}", "rrb-streams", "original / ours")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded)

    title = (
        f"{n:,} x SET users:profile:user-N <uuid4 hex>, -c {CONCURRENCY}, "
        f"median of {report['runs']} run(s); rrb-streams layout: {report['layout']}"
    )
    return "\n".join([title, line(head), *(line(row) for row in rows)])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--keys", type=int, default=10_000, help="keys written (default: 10000)")
    p.add_argument("--runs", type=int, default=3, help="runs per tool (default: 3)")
    p.add_argument(
        "--layout",
        choices=("segments", "keys"),
        help="passed to our rrb, if it has --layout (default: rrb's own default)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument(
        "--original-venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rrb-original-venv",
        help="the original's virtualenv, made if missing (default: %(default)s)",
    )
    p.add_argument("--python", default=ORIGINAL_PYTHON, help="its Python (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="longest wait for a drain, or for a restore (default: %(default)g s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args()
    # A SIGTERM unwinds like ^C, so every finally stops what this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    bin_dir = original_venv(args.original_venv, args.python)
    versions = installed_versions(bin_dir)
    has_layout, layout_default = layout_support()
    if has_layout:
        layout = args.layout or layout_default or "default"
        tools = [original_tool(bin_dir), ours_tool(args.layout)]
    else:
        if args.layout and args.layout != "keys":
            print(f"[!] rrb has no --layout: --layout {args.layout} ignored", file=sys.stderr)
        layout = "keys"
        tools = [original_tool(bin_dir), ours_tool(None)]

    work = Path(tempfile.mkdtemp(prefix="rrb-bench-original-"))
    results: dict[str, list[RunResult]] = {t.name: [] for t in tools}
    try:
        for i in range(args.runs):
            data = workload(args.keys)
            order = tools if i % 2 == 0 else tools[::-1]
            for tool in order:
                result = run_tool(tool, data, work / f"run{i + 1}-{tool.name}", args.timeout)
                results[tool.name].append(result)
                print(f"run {i + 1} {tool.name}: {json.dumps(asdict(result))}", flush=True)
    finally:
        if args.keep:
            print(f"[*] logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    original, ours = summary(results["original"]), summary(results["ours"])
    ours_version = subprocess.run(
        command("rrb", "--version"), capture_output=True, text=True, check=False
    ).stdout.strip()
    report: dict[str, Any] = {
        "keys": args.keys,
        "runs": args.runs,
        "concurrency": CONCURRENCY,
        "layout": layout,
        "original": {
            "version": versions.get("realtime-redis-backup", "?"),
            "python": subprocess.run(
                [str(bin_dir / "python"), "--version"], capture_output=True, text=True, check=True
            ).stdout.strip(),
            "packages": {
                k: versions[k] for k in sorted(versions) if k not in ("pip", "setuptools")
            },
            "median": original,
            "runs": [asdict(r) for r in results["original"]],
        },
        "ours": {
            "version": ours_version,
            "python": sys.version.split()[0],
            "median": ours,
            "runs": [asdict(r) for r in results["ours"]],
        },
        "ratio": {
            "drain": ratio(original["drain_s"], ours["drain_s"]),
            "restore": ratio(original["restore_s"], ours["restore_s"]),
        },
    }
    print()
    print(table(report))
    for name, runs in results.items():
        for i, r in enumerate(runs, 1):
            for note in r.notes:
                print(f"[!] run {i} {name}: {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[*] results written to {args.json}")


if __name__ == "__main__":
    main()
