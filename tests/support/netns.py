"""Hosts on a private network, built from network namespaces, for tests that cut a host off.

:class:`Hosts` creates one network namespace per host (``rrb-<pid>-<host>``), a Linux bridge in
the root namespace, and a veth pair from each host to the bridge, on a private ``10.250.N.0/24``
that nothing on the machine uses. The bridge itself holds ``.254``, so the test process (in the
root namespace) reaches every host. Namespaces share the filesystem: a folder stands in for
shared object storage.

:meth:`Hosts.cut` sets the bridge's end of the host's veth down. The host's own end then has no
carrier, its routes stay, and every packet either way is dropped: established TCP connections
hang as they would on a partitioned network, rather than failing fast with a local error.
:meth:`Hosts.reconnect` brings it back up, and TCP retransmission resumes those connections.

Leaving the block kills every process started through :meth:`Hosts.popen` (by pid) and deletes
every namespace, veth and the bridge it created, whether the test passed or not. When the
machine does not allow namespaces (not root, no ``ip``, no veth or bridge support), entering
fails the test with the reason: it never skips.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

SUBNET_BASE = "10.250"
_LOCK = Path("/tmp/rrb-netns.lock")  # two test runs must not pick the same subnet
_OURS = re.compile(r"^rrb-(\d+)-[a-z0-9]+$")


class NetnsError(RuntimeError):
    """A namespace, veth or bridge command failed."""


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    except FileNotFoundError as exc:
        raise NetnsError("the 'ip' command (iproute2) is not installed") from exc
    if done.returncode != 0:
        raise NetnsError(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers() -> None:
    """Delete namespaces and links of earlier runs whose process is gone (a killed run)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OURS.match(name)
        if m and not _pid_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    for line in _ip("-o", "link", "show").splitlines():
        m = re.match(r"^\d+: (rrb(\d+)[bv]\d*)[@:]", line)
        if m and not _pid_alive(int(m.group(2))):
            subprocess.run(["ip", "link", "del", m.group(1)], capture_output=True, timeout=20)


def _free_subnet(start: int) -> str:
    """``10.250.N`` with no address or route on the machine in it."""
    used = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show", "table", "all")
    for i in range(256):
        n = (start + i) % 256
        prefix = f"{SUBNET_BASE}.{n}."
        if prefix not in used:
            return f"{SUBNET_BASE}.{n}"
    raise NetnsError(f"no free /24 left in {SUBNET_BASE}.0.0/16")


class Hosts:
    """``with Hosts(["redis", "a", "b"], logs) as hosts:`` — named hosts on one bridge."""

    def __init__(self, names: Sequence[str], logs: Path) -> None:
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z0-9]+", n) for n in names):
            raise ValueError(f"host names must be distinct lowercase words: {names!r}")
        self.names = list(names)
        self.logs = logs
        pid = os.getpid()
        self.bridge = f"rrb{pid}b"  # interface names are at most 15 characters
        self._ns = {n: f"rrb-{pid}-{n}" for n in names}
        self._outer = {n: f"rrb{pid}v{i}" for i, n in enumerate(names)}
        self._inner = {n: f"eth{i}" for i, n in enumerate(names)}
        self._subnet = ""
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- addresses ------------------------------------------------------------------------------

    def address(self, host: str) -> str:
        """The host's IPv4 address on the private network."""
        return f"{self._subnet}.{self.names.index(host) + 1}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the private network (the bridge's)."""
        return f"{self._subnet}.254"

    def namespace(self, host: str) -> str:
        return self._ns[host]

    # -- setup and teardown ---------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        if os.geteuid() != 0:
            pytest.fail(
                "network namespaces need root (CAP_NET_ADMIN): run this test as root, "
                "or in a container started with --privileged or --cap-add NET_ADMIN"
            )
        if shutil.which("ip") is None:
            pytest.fail("the 'ip' command is missing: apt-get install iproute2")
        try:
            with _LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _remove_leftovers()
                self._subnet = _free_subnet(os.getpid() % 250)
                self._build()
        except (NetnsError, OSError) as exc:
            self._teardown()
            pytest.fail(f"cannot build hosts with network namespaces on this machine: {exc}")
        return self

    def _build(self) -> None:
        _ip("link", "add", "name", self.bridge, "type", "bridge", "forward_delay", "0")
        self._made_links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.names:
            ns, outer, inner = self._ns[host], self._outer[host], self._inner[host]
            _ip("netns", "add", ns)
            self._made_ns.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            self._made_links.append(outer)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._teardown()

    def _teardown(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel; the namespace goes once it exits
        errors: list[str] = []
        for ns in reversed(self._made_ns):
            try:
                _ip("netns", "del", ns)
            except NetnsError as exc:
                errors.append(str(exc))
        for link in reversed(self._made_links):
            # A veth went with its peer's namespace; the bridge and live ones go here.
            if subprocess.run(["ip", "link", "show", link], capture_output=True).returncode == 0:
                try:
                    _ip("link", "del", link)
                except NetnsError as exc:
                    errors.append(str(exc))
        self._made_ns.clear()
        self._made_links.clear()
        if errors:
            raise NetnsError("teardown left something behind: " + "; ".join(errors))

    # -- processes ------------------------------------------------------------------------------

    def popen(
        self, host: str, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host`` with its output in ``log``; killed when the block ends.

        ``ip netns exec`` execs the command, so the returned pid is the command's own.
        """
        out = log.open("ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self._ns[host], *argv],
                stdout=out,
                stderr=out,
                env=env,
            )
        finally:
            out.close()
        self._procs.append(proc)
        return proc

    def run(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``host`` and return its result (text, captured)."""
        return subprocess.run(
            ["ip", "netns", "exec", self._ns[host], *argv],
            capture_output=True,
            text=True,
            timeout=kwargs.pop("timeout", 30),
            **kwargs,
        )

    # -- faults ---------------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Unplug ``host`` from the bridge: no packet passes either way until reconnected."""
        _ip("link", "set", self._outer[host], "down")

    def reconnect(self, host: str) -> None:
        """Plug ``host`` back in."""
        _ip("link", "set", self._outer[host], "up")

    def is_cut(self, host: str) -> bool:
        """Whether the bridge's end of ``host``'s link is down."""
        flags = re.search(r"<([^>]*)>", _ip("link", "show", self._outer[host]))
        return flags is None or "UP" not in flags.group(1).split(",")
