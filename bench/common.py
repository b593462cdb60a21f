"""Shared pieces of the benchmarks: commands, servers, process memory, medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.servers import RedisServer

BIN = Path(sys.executable).parent


def command(name: str, *args: str) -> list[str]:
    """The argv of one of our console scripts."""
    return [str(BIN / name), *args]


def spawn(name: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start one of our commands with its logs in ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
    env["LOG_LEVEL"] = "WARNING"
    out = log.open("ab")
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


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll ``pred`` until true; return the seconds it took. Raises TimeoutError."""
    start = time.perf_counter()
    while not pred():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not done after {timeout} s")
        time.sleep(interval)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
