"""Each command runs as a Redis user with exactly the ACL rules docs/security.md lists.

The rules are read from the document itself, so the two cannot drift apart. A command passes
when it does its whole job and ``ACL LOG`` shows no refused command or key for its user.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from rrb_streams.format.layout import latest_name
from rrb_streams.format.segment import decode_segment
from tests.support.dataset import snapshot
from tests.support.pipeline import drained
from tests.support.proc import BIN, run_command
from tests.support.restoring import own_keys
from tests.support.servers import RedisServer, child_env
from tests.support.wait import wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
PASSWORD = "acl-test-pw"

Factory = Callable[..., RedisServer]


def documented_rules() -> dict[str, list[str]]:
    """``user -> rules`` of every ``ACL SETUSER`` line in docs/security.md."""
    rules = {}
    for line in DOC.read_text().splitlines():
        if m := re.fullmatch(r"ACL SETUSER (\S+) (.+)", line.strip()):
            rules[m[1]] = m[2].replace("PASSWORD", PASSWORD).split()
    return rules


def test_the_document_lists_a_user_for_every_command() -> None:
    assert set(documented_rules()) == {
        "rrb-bridge",
        "rrb-upload",
        "rrb",
        "rrb-status",
        "rrb-verify",
        "rrb-restore",
    }


def _apply(server: RedisServer) -> None:
    with server.client() as c:
        for user, rules in documented_rules().items():
            c.execute_command("ACL", "SETUSER", user, "reset", *rules)


def _url(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"


def _refusals(server: RedisServer, users: set[str]) -> list[str]:
    """Refused commands and keys of ``users``; a refused channel is the bridge's expected
    first try of its narrower patterns."""
    with server.client() as c:
        entries = c.acl_log(count=1000)
    out = []
    for e in entries:
        user, reason, obj = (_text(e[k]) for k in ("username", "reason", "object"))
        if user in users and reason != "channel":
            out.append(f"{user}: {reason} {obj}")
    return out


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _start(procs: list[subprocess.Popen[str]], *argv: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [str(BIN / argv[0]), *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    procs.append(p)
    return p


def _stop(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-3000:]


def _change(c: redis.Redis, tag: str) -> None:
    for i in range(10):
        c.set(f"{tag}:s{i}", i)
    c.hset(f"{tag}:h", mapping={"a": "1", "b": "2"})
    c.rpush(f"{tag}:l", "x", "y")
    c.set(f"{tag}:ttl", "v", ex=600)
    c.delete(f"{tag}:s0")
    c.set(f"{tag}:last", "the last change")


def _stored(folder: Path, tag: str) -> bool:
    """Whether the last change of :func:`_change` is stored (in a segment, or as its own
    object): with the stream drained, every change before it is then stored too."""
    key = f"{tag}:last".encode()
    if (folder / latest_name("", 0, key)).is_file():
        return True
    for path in (folder / "segments").rglob("*.seg") if (folder / "segments").is_dir() else []:
        _, blocks = decode_segment(path.read_bytes(), str(path))
        if any(r.key == key for b in blocks if isinstance(b, list) for r in b):
            return True
    return False


def test_every_command_does_its_job_with_exactly_the_documented_rules(
    redis_factory: Factory, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    source = redis_factory()
    _apply(source)
    folder = tmp_path / "backup"
    with source.client() as c:
        for i in range(20):
            c.set(f"before:{i}", i)  # found by the bridge's start-up rescan
        c.config_set("notify-keyspace-events", "")  # the bridge sets it, through config|set

        bridge = _start(procs, "rrb-bridge", _url(source, "rrb-bridge"))
        upload = _start(procs, "rrb-upload", _url(source, "rrb-upload"), "--storage", str(folder))
        wait_for(lambda: c.pubsub_numpat() > 0 and drained(c), timeout=20)
        _change(c, "split")
        wait_for(lambda: _stored(folder, "split") and drained(c), timeout=20)
        _stop(bridge)
        _stop(upload)
        assert _refusals(source, {"rrb-bridge", "rrb-upload"}) == []

        shown = run_command("rrb-status", _url(source, "rrb-status"), "--json")
        assert shown.returncode == 0, shown.stderr
        assert '"drained": true' in shown.stdout

        checked = run_command("rrb-verify", _url(source, "rrb-verify"), "--storage", str(folder))
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # One process doing both, as the rrb user; then a difference for --repair to queue.
        both = _start(procs, "rrb", _url(source, "rrb"), "--storage", str(folder))
        wait_for(lambda: c.pubsub_numpat() > 0, timeout=20)
        _change(c, "both")
        wait_for(lambda: _stored(folder, "both") and drained(c), timeout=20)
        _stop(both)
        c.set("missed", "while nothing ran")
        repaired = run_command(
            "rrb-verify",
            _url(source, "rrb-verify"),
            "--storage",
            str(folder),
            "--repair",
            "--recheck-delay",
            "0.1",
        )
        assert repaired.returncode == 3, repaired.stdout + repaired.stderr
        assert c.xlen("rrb:changes") > 0
        assert _refusals(source, {"rrb", "rrb-status", "rrb-verify"}) == []
        expected = snapshot(c)
        del expected[(0, b"missed")]

    target = redis_factory()
    _apply(target)
    restored = run_command(
        "rrb-restore", _url(target, "rrb-restore"), "--storage", str(folder), "--claim-idle", "1"
    )
    assert restored.returncode == 0, restored.stderr
    assert _refusals(target, {"rrb-restore"}) == []
    with target.client() as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}
