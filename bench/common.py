"""Shared pieces of the benchmarks: commands, servers, process memory, medians.

Waiting is :func:`tests.support.wait.wait_for`, as in the tests."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from tests.support.proc import BIN
from tests.support.servers import RedisServer, child_env


def command(name: str, *args: str) -> list[str]:
    """The argv of one of our console scripts."""
    return [str(BIN / name), *args]


def spawn(name: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start one of our commands with its logs in ``log``."""
    out = log.open("ab")
    env = child_env(LOG_LEVEL="WARNING")
    return subprocess.Popen(command(name, *args), stdout=out, stderr=out, env=env)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process, in MiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, kb, _ = line.split()
            values[name] = int(kb) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def redis(workdir: Path, *args: str) -> RedisServer:
    """A fresh redis-server for one run."""
    return RedisServer(workdir, *args).start()


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
