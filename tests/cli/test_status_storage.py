"""``rrb-status --storage``: the change stream and the backup's own state, each shown whatever
became of the other, against a real redis-server, a folder and a moto S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from rrb_streams.cli.status import status
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.group import ensure_group
from rrb_streams.wire.keys import OwnKeys
from tests.compact.helpers import History, ago, compactor
from tests.support.moto import s3_spec
from tests.support.restoring import fs_spec, opened, put_segment
from tests.support.servers import RedisServer, free_port


def make_stream(server: RedisServer) -> None:
    """A change stream with one entry, delivered to nobody yet."""

    async def go() -> None:
        r = Redis.from_url(server.url())
        own = OwnKeys()
        await ensure_group(r, own.stream, "rrb-upload")
        await r.xadd(own.stream, entry_fields(0, b"k", "set", 0))  # type: ignore[arg-type]
        await r.aclose()

    anyio.run(go)


def make_backup(
    spec: StorageSpec, prefix: str = "", *, compact: bool = True, start_s: float = 900
) -> History:
    """Eight level-0 segments read from ``start_s`` ago on, compacted (with a snapshot) when
    ``compact``, then two newer ones that wait for level 1."""
    history = History()

    async def go() -> None:
        async with opened(spec) as storage:
            for i in range(8):
                records = history.make(20, at_us=ago(start_s - i * 10), seed=i)
                await put_segment(storage, records, prefix)
            if compact:
                await compactor(storage, prefix).run_pass(snapshot=True)
                for i in range(2):
                    records = history.make(20, at_us=ago(60 - i * 10), seed=50 + i)
                    await put_segment(storage, records, prefix)

    anyio.run(go)
    return history


def newest_read(history: History) -> int:
    return max(r.read_at_us for r in history.records)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """``rrb-status argv`` in this process: its exit status, stdout, and stderr's lines."""
    capsys.readouterr()  # what preparing the test printed
    code = status(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err.strip().splitlines()


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_status_shows_the_stream_and_the_backup_of_a_folder(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stream(redis_server)
    history = make_backup(fs_spec(tmp_path / "bk"))
    code, data = run_json(capsys, redis_server.url(), "--storage", str(tmp_path / "bk"))
    assert code == 0 and data["errors"] == []
    assert data["change_stream"]["exists"] is True and data["change_stream"]["length"] == 1
    backup = data["backup"]
    assert backup["recovery_point_us"] == newest_read(history)
    assert backup["recovery_point_age_seconds"] >= 40
    assert backup["manifest"] >= 1 and backup["snapshots"] == 1
    assert backup["levels"]["0"] == {"objects": 2, "bytes": backup["levels"]["0"]["bytes"]}
    assert backup["levels"]["snapshot"]["objects"] >= 1
    assert backup["retired"]["objects"] == 8
    assert backup["last_compaction"]["step"] == "snapshot"
    assert backup["compaction_overdue"] is False and backup["overdue_after_seconds"] == 900

    code, out, err = run(capsys, redis_server.url(), "--storage", str(tmp_path / "bk"))
    assert code == 0 and err == []
    stream_part, backup_part = out.split("\n\n")
    assert stream_part.startswith("stream rrb:changes: 1 entries")
    assert backup_part.startswith(f"backup file://{tmp_path / 'bk'}:")
    for line in ("recovery point: ", "level 0: 2 objects", "snapshots kept: 1", "manifest "):
        assert line in backup_part, line
    assert "retired, awaiting deletion: 8 objects" in backup_part
    assert "compaction: on schedule (overdue after 15 min)" in backup_part


def test_status_reads_a_backup_in_s3_under_a_prefix(
    redis_server: RedisServer,
    s3_bucket: str,
    moto_endpoint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_stream(redis_server)
    history = make_backup(s3_spec(s3_bucket, moto_endpoint, base="base/"), "prod/")
    storage = f"s3://{s3_bucket}/base"
    code, data = run_json(capsys, redis_server.url(), "--storage", storage, "-P", "prod")
    assert code == 0, data["errors"]
    assert data["backup"]["storage"].startswith(f"s3://{s3_bucket}/base/")
    assert data["backup"]["storage"].endswith("prod")
    assert data["backup"]["recovery_point_us"] == newest_read(history)
    # Without the prefix there is no backup: said, and exit 1.
    code, data = run_json(capsys, redis_server.url(), "--storage", storage)
    assert code == 1 and data["backup"] is None
    (error,) = data["errors"]
    assert "holds no segment-layout backup" in error


def test_an_unreachable_redis_still_shows_the_backup_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = make_backup(fs_spec(tmp_path / "bk"))
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, out, err = run(capsys, url, "--storage", str(tmp_path / "bk"))
    assert code == 1
    assert out.startswith("backup ") and "recovery point: " in out
    (line,) = err
    assert "cannot reach stream Redis" in line and "hunter2" not in line
    code, data = run_json(capsys, url, "--storage", str(tmp_path / "bk"))
    assert code == 1 and data["change_stream"] is None
    assert data["backup"]["recovery_point_us"] == newest_read(history)
    assert len(data["errors"]) == 1 and "hunter2" not in json.dumps(data)


def test_a_redis_without_stream_still_shows_the_backup_and_exits_1(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_backup(fs_spec(tmp_path / "bk"))
    code, data = run_json(capsys, redis_server.url(), "--storage", str(tmp_path / "bk"))
    assert code == 1
    assert data["change_stream"]["exists"] is False and data["backup"]["manifest"] >= 1
    (error,) = data["errors"]
    assert "no change stream 'rrb:changes'" in error


def test_a_missing_folder_is_one_line_and_the_stream_is_still_shown(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stream(redis_server)
    code, out, err = run(capsys, redis_server.url(), "--storage", str(tmp_path / "nope"))
    assert code == 1 and out.startswith("stream rrb:changes")
    (line,) = err
    assert f"storage folder {tmp_path / 'nope'} does not exist" in line


def test_a_folder_without_backup_is_one_line_and_exit_1(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stream(redis_server)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, redis_server.url(), "--storage", str(tmp_path / "empty"))
    assert code == 1
    (line,) = err
    assert "holds no segment-layout backup" in line and "check --storage and -P" in line


def test_a_missing_bucket_is_one_line_without_secrets(
    redis_server: RedisServer, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stream(redis_server)
    code, _, err = run(capsys, redis_server.url(), "--storage", "s3://no-such-bucket-here/x")
    assert code == 1
    (line,) = err
    assert "no-such-bucket-here" in line and "testing-secret" not in line


def test_a_damaged_manifest_is_named_in_one_line(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stream(redis_server)
    make_backup(fs_spec(tmp_path / "bk"))
    newest = sorted((tmp_path / "bk" / "manifest").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:-1] + b"0")
    code, out, err = run(capsys, redis_server.url(), "--storage", str(tmp_path / "bk"))
    assert code == 1 and out.startswith("stream rrb:changes")
    (line,) = err
    assert newest.name in line and "checksum" in line


def test_overdue_compaction_is_shown_and_follows_level1_every(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Overdue is a finding, not a failure to read: the exit status stays 0."""
    make_stream(redis_server)
    make_backup(fs_spec(tmp_path / "bk"), compact=False, start_s=3600)
    args = (redis_server.url(), "--storage", str(tmp_path / "bk"))
    code, out, err = run(capsys, *args)
    assert code == 0 and err == []
    assert "COMPACTION OVERDUE: level-0 segments waiting since" in out
    assert "compaction: none yet (no manifest)" in out
    code, data = run_json(capsys, *args, "--level1-every", "2h")
    assert code == 0 and data["backup"]["compaction_overdue"] is False
    assert data["backup"]["overdue_after_seconds"] == 3 * 7200


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--storage", "ftp://x/y"], "'ftp'"),
        (["--storage", "s3://A_b"], "'A_b'"),
        (["--storage", "bk", "-P", "../up"], "'../up'"),
        (["--storage", "bk", "--level1-every", "5x"], "invalid --level1-every '5x'"),
        (["--storage", "bk", "--level1-every", "0"], "invalid --level1-every 0"),
        (["--level1-every", "5m"], "--level1-every needs --storage"),
        (["--compaction-grace", "5m"], "--compaction-grace needs --storage"),
        (["--storage", "bk", "--compaction-grace", "soon"], "invalid --compaction-grace 'soon'"),
        (["--age-identity", "key.txt"], "--age-identity needs --storage"),
        (["--storage", "bk", "--age-identity", "/no/such/key.txt"], "cannot read it"),
        (["-P", "prod"], "-P/--path 'prod/' needs --storage"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "redis://127.0.0.1:1/0", *argv)
    assert code == 2
    (line,) = err
    assert needle in line
