"""Our commands as real processes: run to their end, or started for kill -9 and signal tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.servers import child_env

BIN = Path(sys.executable).parent  # where the virtualenv installed our console scripts


def run_command(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run command ``name`` to its end, its output captured as text; ``env`` adds variables
    to :func:`child_env`'s environment."""
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**(env or {})),
        check=False,
    )


def one_line(stderr: str, *, logs: bool = False) -> str:
    """The one line a command printed on ``stderr`` (a refusal, an error), asserting that
    there is exactly one and that it is no traceback; ``logs``: JSON log lines are passed
    over."""
    lines = [line for line in stderr.strip().splitlines() if not (logs and line.startswith("{"))]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


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
        """``kill -9`` unless it has exited; a process paused by SIGSTOP is continued first
        (it dies of SIGKILL anyway, but be sure)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def log_events(text: str, *names: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``text`` whose event is one of ``names``, in order. A line that
    is not JSON (a traceback, a line still being written) is passed over."""
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") in names:
            found.append(entry)
    return found
