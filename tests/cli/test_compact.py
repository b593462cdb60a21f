"""``rrb-compact`` as a real process: one pass, its report, the lease, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio
import pytest

from rrb_streams.cli import options
from rrb_streams.compact.lease import lease_key
from rrb_streams.config import CompactConfig, parse_duration
from rrb_streams.format import manifest as mf
from rrb_streams.wire.keys import OwnKeys
from tests.compact.helpers import History, ago, stored
from tests.support.proc import one_line, run_command
from tests.support.restoring import fs_spec, opened
from tests.support.servers import RedisServer

pytestmark = pytest.mark.anyio


async def backup(path: Path, history: History, segments: int = 6) -> None:
    async with opened(fs_spec(path)) as storage:
        for i in range(segments):
            await history.write(storage, 30, at_us=ago(600 - i * 10), seed=i)


async def test_one_pass_merges_snapshots_and_reports_json(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    history = History()
    await backup(tmp_path / "bk", history)
    done = await anyio.to_thread.run_sync(
        lambda: run_command(
            "rrb-compact",
            redis_server.url(),
            "--storage",
            str(tmp_path / "bk"),
            "--snapshot",
            "--json",
        )
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [s["step"] for s in report["steps"]] == ["level1", "snapshot"]
    assert report["steps"][0]["inputs"] == 6 and report["lost_race"] is False
    async with opened(fs_spec(tmp_path / "bk")) as storage:
        m = await mf.read_latest(storage, "")
        assert m.seq == report["manifest"] and len(m.snapshots) == 1
        assert await stored(storage) == history.truth()
    with redis_server.client() as c:
        assert c.get(lease_key(OwnKeys())) is None  # released


async def test_it_stands_by_while_another_process_holds_the_lease(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await backup(tmp_path / "bk", History())
    with redis_server.client() as c:
        c.set(lease_key(OwnKeys()), "other-host-1-abcd", px=60_000)
    args = ("rrb-compact", redis_server.url(), "--storage", str(tmp_path / "bk"))
    relaxed = await anyio.to_thread.run_sync(lambda: run_command(*args))
    assert relaxed.returncode == 0
    assert "another process holds the compaction lease" in one_line(relaxed.stderr, logs=True)
    strict = await anyio.to_thread.run_sync(lambda: run_command(*args, "--strict"))
    assert strict.returncode == 3
    assert not (tmp_path / "bk" / "manifest").exists()


@pytest.mark.parametrize(
    ("flag", "value", "text"),
    [
        ("--retention", "soon", "invalid --retention 'soon'"),
        ("--retention", "-1h", "invalid --retention '-1h'"),
        ("--retention", "0", "invalid --retention 0"),
        ("--level1-every", "5x", "invalid --level1-every '5x'"),
        ("--compaction-grace", "", "invalid --compaction-grace ''"),
    ],
)
def test_bad_durations_are_one_line_and_exit_2(
    tmp_path: Path, flag: str, value: str, text: str
) -> None:
    done = run_command("rrb-compact", "--storage", str(tmp_path), f"{flag}={value}")
    assert done.returncode == 2
    assert text in one_line(done.stderr)


def test_a_missing_folder_is_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    done = run_command("rrb-compact", redis_server.url(), "--storage", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert "does not exist" in one_line(done.stderr, logs=True)


def test_an_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    done = run_command("rrb-compact", "redis://127.0.0.1:1/0", "--storage", str(tmp_path))
    assert done.returncode == 1
    assert "127.0.0.1:1" in one_line(done.stderr, logs=True)


def test_compaction_options_read_durations_and_default_to_the_settings() -> None:
    p = argparse.ArgumentParser()
    options.add_own_prefix(p, "rrb's keys")
    options.add_tls(p)
    options.add_compaction(p, automatic=True)
    args = p.parse_args(["--retention", "7d", "--level1-every", "90s", "--no-compaction"])
    cfg = options.compaction(args, "redis://h:1/0", "/base/")
    assert (cfg.retention, cfg.level1_every, cfg.enabled) == (7 * 86400, 90, False)
    assert cfg.path_prefix == "base/" and cfg.snapshot_every == CompactConfig.snapshot_every
    defaults = options.compaction(p.parse_args([]), "redis://h:1/0", "")
    assert defaults.retention == 86400 and defaults.grace == 600 and defaults.enabled
    assert [parse_duration(t, "--x") for t in ("90", "2m", "1.5h", "2w")] == [
        90,
        120,
        5400,
        1209600,
    ]
    assert "(default: 24h)" in p.format_help() and "(default: 10m)" in p.format_help()


def test_upload_commands_take_the_compaction_options() -> None:
    for command in ("rrb", "rrb-upload"):
        done = run_command(command, "--help")
        assert done.returncode == 0
        for flag in ("--retention", "--snapshot-every", "--compaction-grace", "--no-compaction"):
            assert flag in done.stdout, (command, flag)
