"""Scale-out across hosts: uploaders on two hosts, one of them cut off the network mid-load.

Three hosts built from network namespaces (:mod:`tests.support.netns`) on one bridge:

- ``redis``: the source Redis, which also holds the change stream (AOF on), and ``rrb-bridge``.
  The bridge runs next to its source so that its path never crosses the cut: the scenario is
  about the uploaders;
- ``a`` and ``b``: one ``rrb-upload`` each (``--claim-idle 2 --lease 2``), both writing to one
  folder, which stands in for shared object storage (namespaces share the filesystem).

The writer and every check run in the root namespace, over the bridge. Host ``a`` is cut off
mid-load: ``b`` claims what was pending on ``a`` and drains the backlog while ``a`` is still cut
off, and the backup then equals the source. ``a`` is reconnected: its stale in-flight segments
must not hide newer records (readers take the highest stamp), and it takes work again. Once the
writer stops and the pipeline drains, the backup equals the source, with no dead letter and
every segment intact.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from rrb_streams.format import segment
from rrb_streams.storage.fs import FsStorage
from rrb_streams.wire.keys import OwnKeys
from tests.support import netns
from tests.support.dataset import latest_records
from tests.support.load import Writer, assert_backup_equals_source
from tests.support.netns import Hosts
from tests.support.pipeline import wait_drained
from tests.support.proc import BIN, log_events
from tests.support.servers import RedisServer, ServerError, child_env, redis_binary
from tests.support.wait import wait_for

OWN = OwnKeys()
PORT = 6379  # every host has its own network stack: no port to share
CUT_LOAD_S = 3.0  # the writer goes on this long after the cut


class HostRedis(RedisServer):
    """A ``redis-server`` inside one of the hosts, bound to that host's address."""

    def __init__(self, hosts: Hosts, host: str, workdir: Path, *args: str) -> None:
        super().__init__(workdir, *args)
        self.hosts, self.host = hosts, host
        self.addr = hosts.address(host)
        self.port = PORT

    def url(self, db: int = 0) -> str:
        return f"redis://{self.addr}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host=self.addr, port=self.port, db=db, socket_timeout=10)

    def start(self) -> HostRedis:
        cmd = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", self.addr,
            "--protected-mode", "no",
            "--dir", str(self.dir),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.args,
        ]  # fmt: skip
        self.proc = self.hosts.popen(self.host, cmd, log=self.dir / "stdout.log")
        try:
            wait_for(self._answers, timeout=10)
        except TimeoutError as exc:
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise ServerError(f"redis-server in host {self.host} did not answer:\n{log}") from exc
        return self

    def _answers(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.exceptions.RedisError:
            return False


def events(log: Path, name: str, after: int = 0) -> list[dict[str, Any]]:
    """The JSON log lines of event ``name`` in ``log``, from byte ``after`` on."""
    with log.open("rb") as f:
        f.seek(after)
        return log_events(f.read().decode(errors="replace"), name)


def consumers(c: redis.Redis) -> dict[str, dict[str, Any]]:
    """``XINFO CONSUMERS`` of the upload group, by consumer name."""
    return {x["name"].decode(): x for x in c.xinfo_consumers(OWN.stream, "rrb-upload")}


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with Hosts(["redis", "a", "b"], tmp_path) as h:
        yield h


def our_leftovers() -> str:
    """Namespaces and links this process created that still exist ("" when none)."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    pid = os.getpid()
    return "\n".join(
        line for line in (ns + links).splitlines() if f"rrb-{pid}-" in line or f"rrb{pid}" in line
    )


ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], 7000))
conn, _ = server.accept()
while data := conn.recv(100):
    conn.sendall(data)
"""


def test_a_cut_host_holds_established_connections_until_reconnected(tmp_path: Path) -> None:
    with Hosts(["a"], tmp_path) as hosts:
        addr = hosts.address("a")
        hosts.popen("a", [sys.executable, "-c", ECHO, addr], log=tmp_path / "echo.log")
        conn: socket.socket | None = None

        def connected() -> bool:
            nonlocal conn
            try:
                conn = socket.create_connection((addr, 7000), timeout=1)
            except OSError:
                return False
            return True

        wait_for(connected, timeout=10)
        assert conn is not None
        with conn:
            conn.sendall(b"one")
            assert conn.recv(100) == b"one"
            hosts.cut("a")
            assert hosts.is_cut("a")
            conn.sendall(b"two")
            conn.settimeout(1.5)
            with pytest.raises(TimeoutError):
                conn.recv(100)
            hosts.reconnect("a")
            assert not hosts.is_cut("a")
            # The same connection resumes once TCP retransmits.
            conn.settimeout(15)
            assert conn.recv(100) == b"two"
    assert not our_leftovers()


def test_hosts_fail_with_the_reason_when_ip_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="'ip' command is missing"):
        Hosts(["a"], tmp_path).__enter__()


def test_hosts_remove_what_they_built_when_the_build_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An address the kernel refuses: the bridge exists by then, the namespaces not yet.
    monkeypatch.setattr(netns, "_free_subnet", lambda start: "10.250.300")
    with pytest.raises(pytest.fail.Exception, match="cannot build hosts"):
        Hosts(["a"], tmp_path).__enter__()
    assert not our_leftovers()


def uploader(hosts: Hosts, host: str, stream: HostRedis, folder: Path, logs: Path) -> Any:
    argv = [
        str(BIN / "rrb-upload"),
        stream.url(),
        "--storage", str(folder),
        "--claim-idle", "2",
        "--lease", "2",
        "--consumer", f"up-{host}",
        # Not under test here, and a pass that runs past the first minute (it may) writes a
        # manifest and merged objects that check_objects would take for strays.
        "--no-compaction",
    ]  # fmt: skip
    return hosts.popen(host, argv, log=logs / f"upload-{host}.log", env=child_env())


def file_names(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


async def check_objects(folder: Path, keys: int) -> int:
    """Every object is a whole segment that decodes, no temporary file is left behind, and
    the newest records stand for exactly ``keys`` live keys."""
    names = file_names(folder)
    parsed = [segment.parse_segment_name(n) for n in names]
    strays = [n for n, p in zip(names, parsed, strict=True) if p is None]
    assert not strays, f"files that are not segments: {strays[:5]}"
    storage = FsStorage(folder)
    try:
        for name in names:
            _, blocks = segment.decode_segment(await storage.get(name), name)
            damaged = [b for b in blocks if isinstance(b, Exception)]
            assert not damaged, damaged[:1]
        live = await latest_records(storage)
    finally:
        await storage.close()
    assert len(live) == keys, f"{len(live)} live keys stored for {keys} keys"
    return len(live)


@pytest.mark.anyio
async def test_an_uploader_host_cut_off_mid_load_loses_nothing_and_rejoins(
    hosts: Hosts,
    redis_factory: Callable[..., RedisServer],
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    folder = tmp_path / "backup"
    source = HostRedis(
        hosts, "redis", tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "everysec"
    ).start()
    bridge = hosts.popen(
        "redis",
        [str(BIN / "rrb-bridge"), source.url()],
        log=tmp_path / "bridge.log",
        env=child_env(),
    )
    procs = {h: uploader(hosts, h, source, folder, tmp_path) for h in ("a", "b")}
    log_a, log_b = tmp_path / "upload-a.log", tmp_path / "upload-b.log"
    with source.client() as c:
        wait_for(lambda: {"up-a", "up-b"} <= set(consumers(c)) if c.exists(OWN.stream) else False)

    writer = Writer(source)
    writer.start()
    try:
        await anyio.sleep(3.0)
        assert bridge.poll() is None, (tmp_path / "bridge.log").read_text(errors="replace")
        # With segments a batch ends once its segment is written (about a second after it
        # began), and host b may have taken the first ones: give a a moment to finish one.
        wait_for(lambda: bool(events(log_a, "upload.batch_written")), timeout=20)
        claims_before = len(events(log_b, "upload.claimed"))
        hosts.cut("a")
        cut_at = time.monotonic()
        stranded = 0
        with source.client() as c:
            while time.monotonic() - cut_at < CUT_LOAD_S:
                stranded = max(stranded, int(consumers(c)["up-a"]["pending"]))
                await anyio.sleep(0.1)
    finally:
        writer.stop()
    changes_before_reconnect = writer.changes
    assert stranded > 0, "nothing was pending on host a after the cut: nothing to claim"

    # While a is still cut off, b claims its entries and drains the backlog alone.
    stopped = time.monotonic()
    await wait_drained(source.url(), within=45)
    drain = round(time.monotonic() - stopped, 2)
    assert hosts.is_cut("a")
    with source.client() as c:
        state = consumers(c)
        assert state["up-a"]["pending"] == 0
        # a has not reached the stream since the cut: b did the work.
        assert state["up-a"]["idle"] >= (time.monotonic() - cut_at - 1) * 1000
    claims = events(log_b, "upload.claimed")[claims_before:]
    claimed = sum(int(e["entries"]) for e in claims)
    assert claimed >= 1
    target = redis_factory()
    keys_during_cut = await assert_backup_equals_source(source, target, folder)
    cut_seconds = round(time.monotonic() - cut_at, 1)

    # Reconnected, a delivers its stale in-flight work and takes new work again.
    offset = log_a.stat().st_size
    hosts.reconnect("a")
    reconnected = time.monotonic()
    writer = Writer(source)
    writer.start()
    try:
        wait_for(
            lambda: any(e["entries"] for e in events(log_a, "upload.batch_written", offset)),
            timeout=40,
            interval=0.2,
        )
        rejoin = round(time.monotonic() - reconnected, 1)
        await anyio.sleep(2.0)
    finally:
        writer.stop()
    stopped = time.monotonic()
    await wait_drained(source.url(), within=45)
    final_drain = round(time.monotonic() - stopped, 2)

    after = events(log_a, "upload.batch_written", offset)
    with source.client() as c:
        assert c.xlen(OWN.dead) == 0, c.xrange(OWN.dead, count=5)
        assert consumers(c)["up-a"]["pending"] == 0
    for host, proc in procs.items():
        proc.terminate()
        assert proc.wait(20) == 0, f"up-{host} exited with {proc.returncode}"
    for log in (log_a, log_b):
        assert "Traceback" not in log.read_text(errors="replace")
    final_target = redis_factory()
    keys = await assert_backup_equals_source(source, final_target, folder)
    objects = await check_objects(folder, keys)
    fault_report(
        injected=f"host a cut off {cut_seconds} s (ip link set down) under load",
        changes=changes_before_reconnect + writer.changes,
        pending_on_a_after_cut=stranded,
        claimed_by_b=claimed,
        drain_seconds_while_cut=drain,
        keys_equal_while_cut=keys_during_cut,
        rejoin_seconds=rejoin,
        a_batches_after_rejoin=sum(1 for e in after if e["entries"]),
        a_puts_after_rejoin=sum(int(e["puts"]) for e in after),
        a_redone_after_rejoin=sum(int(e["redone"]) for e in after),
        final_drain_seconds=final_drain,
        keys=keys,
        objects=objects,
        dead_letters=0,
        differences=0,
    )
