"""Our commands as real processes, for kill -9 and signal tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.servers import child_env

BIN = Path(sys.executable).parent


class Command:
    """One rrb command running as a child process, with its output in a log file."""

    def __init__(self, name: str, *args: str, log: Path, **env: str) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.env = child_env(**env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Command:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / self.name), *self.args], stdout=out, stderr=out, env=self.env
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
