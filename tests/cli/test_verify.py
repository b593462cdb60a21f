"""The rrb-verify command as a real process: summary, JSON, exit statuses, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.support.proc import one_line, run_command
from tests.support.restoring import backup_keys, fs_spec, opened
from tests.support.servers import RedisServer, free_port


def run_verify(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run_command("rrb-verify", *args, timeout=timeout)


def backed_up(server: RedisServer, folder: Path) -> int:
    """A few keys, stored as the uploader stores them; how many."""

    async def go() -> int:
        async with opened(fs_spec(folder)) as storage:
            with server.client() as c:
                for i in range(12):
                    c.set(b"k:%02d" % i, b"v%d" % i, px=600_000 if i % 2 else None)
                return len(await backup_keys(c, storage))

    return anyio.run(go)


def test_cli_clean_backup_exits_0_with_a_summary(redis_server: RedisServer, tmp_path: Path) -> None:
    n = backed_up(redis_server, tmp_path / "b")
    done = run_verify(redis_server.url(), "--storage", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"Verify: storage matches the source: {n} keys checked, 0 missing, 0 stale, 0 extra"
    ]


def test_cli_differences_exit_3_and_json_names_them(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    n = backed_up(redis_server, tmp_path / "b")
    with redis_server.client() as c:
        c.set(b"k:00", b"changed")
        c.delete(b"k:01")
        c.set(b"k:new", b"x")
    args = (redis_server.url(), "--storage", str(tmp_path / "b"), "--recheck-delay", "0.1")
    done = run_verify(*args, "--json")
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout) == {
        "checked": n + 1,
        "missing": 1,
        "stale": 1,
        "extra": 1,
        "changing": 0,
        "unreadable": 0,
        "examples": {"missing": ["db0:k:new"], "stale": ["db0:k:00"], "extra": ["db0:k:01"]},
    }
    text = run_verify(*args)
    assert text.returncode == 3
    assert text.stdout.splitlines() == [
        f"Verify: differences found: {n + 1} keys checked, 1 missing, 1 stale, 1 extra",
        "  missing: db0:k:new",
        "  stale: db0:k:00",
        "  extra: db0:k:01",
    ]
    repaired = run_verify(*args, "--json", "--repair", "--match", "k:0*")
    assert repaired.returncode == 3
    out = json.loads(repaired.stdout)
    assert (out["missing"], out["stale"], out["extra"], out["queued"]) == (0, 1, 1, 2)
    with redis_server.client() as c:
        assert sorted(f[b"key"] for _, f in c.xrange(b"rrb:changes")) == [b"k:00", b"k:01"]


@pytest.mark.parametrize(
    ("args", "status", "named"),
    [
        (["redis://127.0.0.1:notaport/0"], 2, "notaport"),
        (["--storage", "ftp://host/x"], 2, "ftp://host/x"),
        (["--recheck-delay", "-1"], 2, "--recheck-delay"),
        (["--match", ""], 2, "--match"),
        (["--bogus"], 2, "--bogus"),
        (["--storage", "{missing}"], 1, "missing-folder"),
        (["redis://127.0.0.1:{port}/0"], 1, "127.0.0.1:{port}"),
    ],
    ids=[
        "bad-url",
        "bad-scheme",
        "bad-delay",
        "empty-match",
        "unknown-option",
        "no-folder",
        "down",
    ],
)
def test_cli_bad_input_gets_one_line_and_changes_nothing(
    redis_server: RedisServer, tmp_path: Path, args: list[str], status: int, named: str
) -> None:
    port = str(free_port())
    fill = {"missing": str(tmp_path / "missing-folder"), "port": port}
    argv = [a.format(**fill) for a in args]
    if not argv[0].startswith("redis://"):
        argv.insert(0, redis_server.url())
    if "--storage" not in argv:
        argv += ["--storage", str(tmp_path / "b")]
        (tmp_path / "b").mkdir(exist_ok=True)
    done = run_verify(*argv, "--repair", timeout=20)
    assert done.returncode == status, done.stderr
    assert named.format(**fill) in one_line(done.stderr, logs=True)
    assert done.stdout == ""
    assert not (tmp_path / "missing-folder").exists()
    with redis_server.client() as c:
        assert c.dbsize() == 0
