"""Real ``redis-server`` processes on free ports, for tests and benchmarks.

A missing ``redis-server`` raises ``ServerError`` with a clear message: tests fail, never skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import redis

from tests.support.wait import wait_for


class ServerError(RuntimeError):
    """A test server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServerError(
            "redis-server is not installed: run 'apt-get install redis-server' "
            "(the README's test command does this)"
        )
    return path


class RedisServer:
    """One ``redis-server`` process that a test can stop, kill -9 and restart on its port."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def start(self) -> RedisServer:
        cmd = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(self._ready, timeout=10, interval=0.02)
        except TimeoutError:
            raise ServerError(f"redis-server on port {self.port} did not answer in 10 s") from None
        return self

    def _ready(self) -> bool:
        """Whether it answers PING yet; ``ServerError`` once its process has exited."""
        try:
            with self.client() as c:
                c.ping()
            return True
        except redis.exceptions.BusyLoadingError:
            return False
        except redis.exceptions.ConnectionError:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise ServerError(f"redis-server on port {self.port} exited:\n{log}") from None
            return False

    def _end(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """``kill -9``."""
        self._end(signal.SIGKILL)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a command run as a subprocess: JSON logs, no S3 leakage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
    env.update(extra)
    return env
