"""The rrb-restore command as a real process: output, exit statuses, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis

from rrb_streams.attime import format_at
from rrb_streams.format import codec, layout
from rrb_streams.format.legacy import encode_legacy, legacy_name
from tests.support.dataset import snapshot
from tests.support.moto import S3_SECRET_KEY, s3_env, s3_spec
from tests.support.proc import one_line
from tests.support.restoring import (
    backup_keys,
    dumped_record,
    fs_spec,
    opened,
    own_keys,
    populate_every_type,
    run_cli,
    total_keys,
)
from tests.support.servers import RedisServer, free_port

Factory = Callable[..., RedisServer]
FAST = ("--claim-idle", "1", "--retry-timeout", "5")


def backed_up(source: RedisServer, folder: Path, bulk: int = 30) -> dict[bytes, str]:
    """Fill ``source`` and store its keys in ``folder``; returns each key's object name."""

    async def go() -> dict[bytes, str]:
        async with opened(fs_spec(folder)) as storage:
            with source.client() as c:
                return await backup_keys(c, storage)

    with source.client() as c:
        populate_every_type(c, bulk=bulk)
    return anyio.run(go)


def test_cli_restores_prints_a_summary_and_a_second_run_starts_over(
    redis_factory: Factory, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    names = backed_up(source, folder)
    with source.client() as c:
        expected = snapshot(c)
    n = len(expected)
    assert len(names) == n

    done = run_cli(target.url(), "--storage", str(folder), "-c", "2", *FAST)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Restore finished: {n} keys restored (")
    assert lines[1] == "  skipped: 0 expired, 0 filtered, 0 existing, 0 absent"
    assert lines[2] == "  failed: 0"
    assert lines[3].startswith(f"  this process: {n} keys in ")
    assert len(lines) == 4
    with target.client() as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}
        t.set(b"s:plain", b"changed in between")
        t.delete(b"bulk:0001")

    # The same command again, the target from REDIS_SERVER: a new run, not a resumed one.
    again = run_cli("--storage", str(folder), "--json", *FAST, env={"REDIS_SERVER": target.url()})
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["finished"] is True
    assert data["resumed"] is False
    assert data["run_totals"]["restored"] == n
    assert data["run_totals"]["objects_listed"] == n
    assert data["run_totals"]["failed"] == 0
    assert data["failures"] == []
    assert data["this_process"]["restored"] == n
    with target.client() as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}


def test_cli_names_damaged_objects_and_exits_3(redis_factory: Factory, tmp_path: Path) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    names = backed_up(source, folder)
    with source.client() as c:
        expected = snapshot(c)
    damaged = {
        b"bulk:0003": lambda d: d[:-1],
        b"l:large:ttl": lambda d: d[:100] + bytes([d[100] ^ 0x01]) + d[101:],
        b"s:plain": lambda d: b"\x00garbage\xff" * 9,
    }
    for key, damage in damaged.items():
        path = folder / names[key]
        path.write_bytes(damage(path.read_bytes()))
    bad = {names[k] for k in damaged}

    result = run_cli(target.url(), "--storage", str(folder), "--json", *FAST)
    assert result.returncode == 3, result.stderr
    data = json.loads(result.stdout)
    assert data["run_totals"]["failed"] == 3
    assert data["run_totals"]["restored"] == len(expected) - 3
    assert {f["object"] for f in data["failures"]} == bad
    assert all(f["reason"].startswith(f["object"] + ": ") for f in data["failures"])
    with target.client() as t:
        assert snapshot(t) == {k: v for k, v in expected.items() if k[1] not in damaged}
        assert own_keys(t) == {}

    text = run_cli(target.url(), "--storage", str(folder), *FAST)
    assert text.returncode == 3, text.stderr
    lines = text.stdout.splitlines()
    assert "  failed: 3" in lines
    shown = lines[lines.index("  failed: 3") + 1 : lines.index("  failed: 3") + 4]
    assert {line.strip().split(": ", 1)[0] for line in shown} == bad
    for name in bad:  # the log names them too, one event each
        assert f'"object": "{name}"' in text.stderr


def test_cli_dry_run_prints_the_plan_and_writes_nothing(
    redis_factory: Factory, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    names = backed_up(source, folder)
    (folder / "README.txt").write_text("not an object")
    sizes = sorted((name, (folder / name).stat().st_size) for name in names.values())

    result = run_cli(target.url(), "--storage", str(folder), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "dry_run": True,
        "objects_listed": len(names) + 1,
        "foreign_objects": 1,
        "keys": len(names),
        "bytes": sum(size for _, size in sizes),
        "absent": 0,
        "segments": 0,
        "damaged_segments": 0,
        "segment_records": 0,
        "key_ranges": 0,
        "sample": [name for name, _ in sizes[:10]],
    }

    text = run_cli(target.url(), "--storage", str(folder), "--dry-run", "--match", "bulk:*")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "Dry run: nothing is written."
    assert f"  objects listed: {len(names) + 1:,} (1 not rrb objects, ignored)" in lines
    assert any(
        line.startswith(f"  keys to restore: {len(names):,} (") and "--match" in line
        for line in lines
    )
    sample = lines[lines.index("  sample:") + 1 :]
    assert [s.strip() for s in sample] == [name for name, _ in sizes[:10]]
    with target.client() as t:
        assert total_keys(t) == 0


@pytest.mark.parametrize(("mode", "status"), [("skip", 0), ("fail", 3)])
def test_cli_if_exists(redis_factory: Factory, tmp_path: Path, mode: str, status: int) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    backed_up(source, folder, bulk=5)
    with target.client() as t:
        t.set(b"s:plain", b"target's")
    result = run_cli(target.url(), "--storage", str(folder), "--if-exists", mode, "--json", *FAST)
    assert result.returncode == status, result.stderr
    totals = json.loads(result.stdout)["run_totals"]
    assert totals["existing" if mode == "skip" else "failed"] == 1
    with target.client() as t:
        assert t.get(b"s:plain") == b"target's"


def test_cli_at_restores_the_version_read_at_or_before_it(
    redis_factory: Factory, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    t1, t2 = 1_790_000_000_000_000, 1_790_000_000_500_000

    async def write_versions() -> None:
        async with opened(fs_spec(folder)) as storage:
            with source.client() as c:
                for value, at in ((b"one", t1), (b"two", t2)):
                    c.set(b"k", value)
                    rec = dumped_record(c, b"k", read_at_us=at)
                    name = layout.version_name("", 0, b"k", at, tombstone=False)
                    await storage.put(name, codec.encode(rec))
            await storage.flush()

    anyio.run(write_versions)
    for at, expected in ((format_at(t1 + 250_000), b"one"), ("1790000000.5", b"two")):
        result = run_cli(target.url(), "--storage", str(folder), "--at", at, *FAST)
        assert result.returncode == 0, result.stderr
        with target.client() as t:
            assert t.get(b"k") == expected
            assert own_keys(t) == {}


def test_cli_at_on_a_backup_without_versions_exits_2_saying_why(
    redis_factory: Factory, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    folder = tmp_path / "backup"
    backed_up(source, folder, bulk=1)
    result = run_cli(target.url(), "--storage", str(folder), "--at", "2026-11-24T03:00:00Z")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line == (
        "rrb-restore: error: --at needs segments or a keys-layout backup made with "
        f"--versioning, and file://{folder} holds neither: only the latest state can be "
        "restored (drop --at)"
    )
    assert result.stdout == ""
    with target.client() as t:
        assert total_keys(t) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--if-exists", "maybe"], "invalid choice: 'maybe'"),
        (["--at", "yesterday"], "invalid --at 'yesterday'"),
        (["--db", "1", "--format", "legacy"], "invalid --db with --format legacy"),
        (["--db", "-1"], "invalid --db -1"),
        (["-c", "0"], "invalid --concurrency 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    redis_server: RedisServer, tmp_path: Path, args: list[str], needle: str
) -> None:
    result = run_cli(redis_server.url(), "--storage", str(tmp_path), *args)
    assert result.returncode == 2
    assert needle in one_line(result.stderr)
    with redis_server.client() as t:
        assert total_keys(t) == 0


def test_cli_target_url_with_a_db_needs_db(redis_server: RedisServer, tmp_path: Path) -> None:
    result = run_cli(redis_server.url(3), "--storage", str(tmp_path))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "selects db 3" in line
    assert "add --db N" in line


def test_cli_restores_from_s3(
    redis_factory: Factory, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()

    async def backup() -> None:
        async with opened(s3_spec(s3_bucket, moto_endpoint, base="backups/")) as storage:
            with source.client() as c:
                populate_every_type(c, bulk=10)
                await backup_keys(c, storage, prefix="p/")

    anyio.run(backup)
    with source.client() as c:
        expected = snapshot(c)
    args = (target.url(), "--storage", f"s3://{s3_bucket}/backups", "-P", "p", "--json", *FAST)
    result = run_cli(*args, env=s3_env(moto_endpoint))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run_totals"]["restored"] == len(expected)
    assert S3_SECRET_KEY not in result.stdout + result.stderr
    with target.client() as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}


def test_cli_on_objects_of_the_original_tool_without_format_legacy_says_so(
    redis_factory: Factory, tmp_path: Path
) -> None:
    target = redis_factory()
    folder = tmp_path / "backup"
    folder.mkdir()
    for i in range(3):
        key = b"user:%d" % i
        (folder / legacy_name(key, 1_700_000_000 + i)).write_bytes(encode_legacy(key, b"v"))
    result = run_cli(target.url(), "--storage", str(folder), *FAST)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"rrb-restore: error: file://{folder} holds objects of the original tool, no rrb objects: "
        "add --format legacy\n"
    )
    with target.client() as t:
        assert total_keys(t) == 0

    legacy = run_cli(target.url(), "--storage", str(folder), "--format", "legacy", "--json")
    assert legacy.returncode == 0, legacy.stderr
    assert json.loads(legacy.stdout)["run_totals"]["restored"] == 3
    with target.client() as t:
        assert snapshot(t) == {(0, b"user:%d" % i): ("string", b"v", -1) for i in range(3)}
        assert own_keys(t) == {}


def test_cli_on_an_empty_backup_says_there_is_nothing_to_restore(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A mistyped folder or -P must not look like a successful restore.
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a backup object\n")
    result = run_cli(redis_server.url(), "--storage", str(folder), "--json", *FAST)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "holds no rrb backup objects: nothing to restore" in result.stderr
    with redis_server.client() as t:
        assert total_keys(t) == 0
        assert own_keys(t) == {}


def test_cli_unreachable_or_read_only_target_is_one_line_and_exit_1(
    redis_factory: Factory, tmp_path: Path
) -> None:
    primary = redis_factory()
    replica = redis_factory("--replicaof", "127.0.0.1", str(primary.port))
    folder = tmp_path / "backup"
    backed_up(primary, folder, bulk=1)

    gone = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run_cli(gone, "--storage", str(folder), *FAST)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "cannot reach" in line
    assert "hunter2" not in line

    result = run_cli(replica.url(), "--storage", str(folder), *FAST)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "refused a probe write" in line
    assert "read only replica" in line


def test_cli_never_shows_the_target_password(redis_factory: Factory, tmp_path: Path) -> None:
    source, target = redis_factory(), redis_factory()
    with target.client() as t:
        t.config_set("requirepass", "hunter2")
    folder = tmp_path / "backup"
    backed_up(source, folder, bulk=3)
    with source.client() as c:
        expected = snapshot(c)
    url = f"redis://:hunter2@127.0.0.1:{target.port}/0"
    result = run_cli(url, "--storage", str(folder), "--debug", *FAST)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    with redis.Redis(port=target.port, password="hunter2") as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}
