"""Command-line behaviour: one-line errors, exit statuses, rrb-status output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rrb_streams.cli.backup import bridge, rrb, upload
from rrb_streams.cli.status import status
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.group import ensure_group
from rrb_streams.wire.keys import OwnKeys
from tests.support.servers import RedisServer


@pytest.mark.parametrize(
    ("command", "argv", "needle"),
    [
        (upload, ["redis://127.0.0.1:1/0", "-c", "0"], "--concurrency 0"),
        (upload, ["redis://127.0.0.1:1/0", "--storage", "ftp://x/y"], "'ftp'"),
        (upload, ["redis://127.0.0.1:1/0", "--storage", "s3://A_b"], "'A_b'"),
        (upload, ["http://127.0.0.1/0"], "http://127.0.0.1/0"),
        (rrb, ["redis://127.0.0.1:1/x"], "database must be a number"),
        (rrb, ["--no-such-option"], "--no-such-option"),
        (rrb, ["-c", "many"], "'many'"),
        (bridge, ["redis://127.0.0.1:1/0", "-r", ""], "--redis-pattern"),
        (status, ["redis://h:99999/0"], "99999"),
        (upload, ["redis://127.0.0.1:1/0", "-P", "../up"], "'../up'"),
        # Process memory is a unit-test backend, never a place a backup can go.
        (upload, ["redis://127.0.0.1:1/0", "--storage", "memory://"], "'memory'"),
        (rrb, ["redis://127.0.0.1:1/0", "--storage", "memory://"], "'memory'"),
    ],
)
def test_cli_bad_input_gets_one_line_and_exit_2(
    command: object, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(command)
    with pytest.raises(SystemExit) as exc_info:
        code = command(argv)
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0]
    assert "Traceback" not in err[0]


def test_cli_unreachable_redis_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.servers import free_port

    code = status([f"redis://:hunter2@127.0.0.1:{free_port()}/0"])
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot reach stream Redis" in err
    assert "hunter2" not in err
    assert "Traceback" not in err


def test_status_reports_pending_lag_and_drained(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import anyio
    from redis.asyncio import Redis

    own = OwnKeys()

    async def prepare() -> None:
        r = Redis.from_url(redis_server.url())
        await ensure_group(r, own.stream, "rrb-upload")
        for i in range(5):
            await r.xadd(own.stream, entry_fields(0, b"k%d" % i, "set", 0))  # type: ignore[arg-type]
        await r.xreadgroup("rrb-upload", "worker-a", {own.stream: ">"}, count=2)
        await r.aclose()

    anyio.run(prepare)
    assert status([redis_server.url(), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exists"] is True
    assert data["length"] == 5
    (group,) = data["groups"]
    assert group["pending"] == 2
    assert group["lag"] == 3
    assert group["consumers"][0]["name"] == "worker-a"
    assert group["oldest_pending_age_ms"] is not None
    assert data["drained"] is False

    assert status([redis_server.url()]) == 0
    text = capsys.readouterr().out
    assert "pending 2" in text
    assert "not drained" in text


def test_status_on_a_redis_without_stream(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status([redis_server.url(), "--json"]) == 1
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["exists"] is False
    assert data["drained"] is False
    assert "no change stream 'rrb:changes'" in out.err


def test_upload_stops_at_start_naming_an_unusable_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "backup"
    code = upload(["redis://127.0.0.1:1/0", "--storage", str(bad)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(bad) in err[0]
    assert "Traceback" not in err[0]


def test_upload_stops_at_start_naming_a_missing_bucket(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = upload(["redis://127.0.0.1:1/0", "--storage", "s3://no-such-bucket-here/x"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no-such-bucket-here" in err[0]
    assert "testing-secret" not in err[0]
