"""Bad invocations of every command, and a snapshot of everything they might have changed.

A :class:`Case` holds a command line whose arguments, environment and expected text may name
places of the :class:`World` as ``{placeholders}``: ``{src}`` a plain Redis, ``{noconfig}``
one with CONFIG disabled, ``{auth}`` one with a password, ``{closed}`` a port nothing listens
on, ``{root}`` the folder holding every storage folder, ``{backup}`` a folder with a backup
in it, ``{file}`` a regular file, ``{moto}`` the S3 endpoint.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support.moto import boto_client
from tests.support.proc import BIN
from tests.support.servers import RedisServer, child_env

PASSWORD = "s3cret-redis-pass"
TIMEOUT = 20.0  # a hang is killed after this long, and fails the case


@dataclass(frozen=True)
class Case:
    """One bad invocation: what to run and what its one line must say."""

    id: str
    command: str
    args: tuple[str, ...]
    status: int  # 2: bad input; 1: a dependency unreachable or refusing; 0: a clear report
    needles: tuple[str, ...]  # each must appear in the one line
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()  # must appear nowhere in the output


@dataclass
class World:
    """The servers and folders the cases run against."""

    src: RedisServer
    noconfig: RedisServer
    auth: RedisServer
    closed: int
    root: Path
    backup: Path
    file: Path
    moto: str

    def names(self) -> dict[str, str]:
        return {
            "src": self.src.url(),
            "src_port": str(self.src.port),
            "noconfig": self.noconfig.url(),
            "auth_port": str(self.auth.port),
            "closed": str(self.closed),
            "root": str(self.root),
            "backup": str(self.backup),
            "file": str(self.file),
            "moto": self.moto,
            "password": PASSWORD,
        }

    def fill(self, text: str) -> str:
        return text.format(**self.names())

    def redis_ports(self) -> dict[str, tuple[int, str | None]]:
        """Each server's port and password."""
        return {
            "src": (self.src.port, None),
            "noconfig": (self.noconfig.port, None),
            "auth": (self.auth.port, PASSWORD),
        }


@dataclass(frozen=True)
class Outcome:
    status: int
    output: str  # stderr, then stdout
    seconds: float


def run(world: World, case: Case) -> Outcome:
    """Run ``case`` as a child process in ``world.root``; a hang is killed after TIMEOUT."""
    env = child_env(**{k: world.fill(v) for k, v in case.env.items()})
    for name in ("REDIS_SERVER", "LOG_LEVEL"):
        if name not in case.env:
            env.pop(name, None)
    argv = [str(BIN / case.command), *(world.fill(a) for a in case.args)]
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        cwd=world.root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - started
    output = (proc.stderr + proc.stdout).decode(errors="replace")
    return Outcome(proc.returncode, output, seconds)


def _redis_state(name: str, port: int, password: str | None) -> dict[str, Any]:
    def client(db: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, db=db, password=password)

    state: dict[str, Any] = {}
    with client(0) as r:
        keyspace = r.info("keyspace")
        if name != "noconfig":
            state["notify"] = r.config_get("notify-keyspace-events")
    for section in keyspace:
        with client(int(str(section).removeprefix("db"))) as c:
            state[section] = {k: c.dump(k) for k in sorted(c.scan_iter(count=1000))}
    return state


def _folder_state(root: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            out.append((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1))
    return sorted(out)


def _bucket_state(moto: str) -> dict[str, list[str]]:
    s3 = boto_client(moto)
    out: dict[str, list[str]] = {}
    for b in s3.list_buckets()["Buckets"]:
        listed = s3.list_objects_v2(Bucket=b["Name"])
        out[b["Name"]] = sorted(o["Key"] for o in listed.get("Contents", []))
    return out


def state(world: World) -> dict[str, Any]:
    """Everything a bad invocation must leave as it was: every key, CONFIG, folders, buckets."""
    out: dict[str, Any] = {
        n: _redis_state(n, port, pw) for n, (port, pw) in world.redis_ports().items()
    }
    out["folders"] = _folder_state(world.root)
    out["buckets"] = _bucket_state(world.moto)
    return out
