"""Bad invocations and environments of every command, run as real processes.

Each answers within seconds with one line that names the bad value (passwords masked), exits
2 for bad input and 1 for an unreachable or refusing dependency, prints no traceback unless
``--debug``, and changes nothing in any Redis, folder or bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from rrb_streams.storage.fs import FsStorage
from tests.support.badinput import BIN, PASSWORD, Case, World, run, state
from tests.support.restoring import backup_keys
from tests.support.servers import RedisServer, free_port

S3_ENV = {
    "S3_SERVER": "{moto}",
    "S3_ACCESS_KEY": "bad-input-access",
    "S3_SECRET_KEY": "bad-input-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
WRONG = "wrong-pass-do-not-print"
CLOSED = "redis://127.0.0.1:{closed}/0"

CASES = [
    # A dependency unreachable or refusing us: exit 1.
    Case(
        "status-unreachable",
        "rrb-status",
        (f"redis://:{WRONG}@127.0.0.1:{{closed}}/0",),
        1,
        ("redis://:***@127.0.0.1:{closed}/0",),
        secrets=(WRONG,),
    ),
    Case("bridge-unreachable", "rrb-bridge", (CLOSED,), 1, (CLOSED,)),
    Case(
        "upload-unreachable",
        "rrb-upload",
        (CLOSED, "--storage", "{root}/new-backup"),
        1,
        (CLOSED,),
    ),
    Case("rrb-unreachable", "rrb", (CLOSED, "--storage", "{root}/new-backup"), 1, (CLOSED,)),
    Case("restore-unreachable", "rrb-restore", (CLOSED, "--storage", "{backup}"), 1, (CLOSED,)),
    Case(
        "restore-unreachable-stream",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--stream-url", CLOSED),
        1,
        (CLOSED,),
    ),
    Case(
        "bridge-config-disabled",
        "rrb-bridge",
        ("{noconfig}",),
        1,
        ("refused CONFIG", "notify-keyspace-events"),
    ),
    Case(
        "rrb-config-disabled",
        "rrb",
        ("{noconfig}", "--storage", "{root}/new-backup"),
        1,
        ("refused CONFIG", "notify-keyspace-events"),
    ),
    Case(
        "status-wrong-password",
        "rrb-status",
        (f"redis://:{WRONG}@127.0.0.1:{{auth_port}}/0",),
        1,
        ("redis://:***@127.0.0.1:{auth_port}/0", "credentials"),
        secrets=(WRONG,),
    ),
    Case(
        "upload-no-password",
        "rrb-upload",
        ("redis://127.0.0.1:{auth_port}/0", "--storage", "{root}/new-backup"),
        1,
        ("redis://127.0.0.1:{auth_port}/0", "credentials"),
    ),
    Case(
        "restore-wrong-password",
        "rrb-restore",
        (f"redis://:{WRONG}@127.0.0.1:{{auth_port}}/0", "--storage", "{backup}"),
        1,
        ("redis://:***@127.0.0.1:{auth_port}/0", "credentials"),
        secrets=(WRONG,),
    ),
    Case(
        "upload-missing-bucket",
        "rrb-upload",
        ("{src}", "--storage", "s3://no-such-bucket-here/x"),
        1,
        ("no-such-bucket-here",),
        env=S3_ENV,
        secrets=("bad-input-secret-key",),
    ),
    Case(
        "restore-missing-bucket",
        "rrb-restore",
        ("{src}", "--storage", "s3://no-such-bucket-here/x"),
        1,
        ("no-such-bucket-here",),
        env=S3_ENV,
        secrets=("bad-input-secret-key",),
    ),
    Case(
        "upload-s3-unreachable",
        "rrb-upload",
        ("{src}", "--storage", "s3://some-bucket/x"),
        1,
        ("http://127.0.0.1:{closed}", "some-bucket"),
        env={**S3_ENV, "S3_SERVER": "http://127.0.0.1:{closed}"},
        secrets=("bad-input-secret-key",),
    ),
    Case(
        "restore-missing-folder",
        "rrb-restore",
        ("{src}", "--storage", "{root}/no-such-backup"),
        1,
        ("{root}/no-such-backup",),
    ),
    Case(
        "restore-wrong-prefix",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "-P", "no-such-prefix/"),
        1,
        ("{backup}/no-such-prefix", "no rrb backup objects"),
    ),
    Case(
        "restore-wrong-format",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--format", "legacy"),
        1,
        ("{backup}", "drop --format legacy"),
    ),
    Case(
        "restore-folder-under-a-file",
        "rrb-restore",
        ("{src}", "--storage", "{file}/sub"),
        1,
        ("{file}/sub",),
    ),
    Case(
        "upload-folder-under-a-file",
        "rrb-upload",
        ("{src}", "--storage", "{file}/sub"),
        1,
        ("{file}/sub",),
    ),
    Case("rrb-storage-is-a-file", "rrb", ("{src}", "--storage", "{file}"), 1, ("{file}",)),
    # Bad input: exit 2.
    Case(
        "bridge-malformed-url",
        "rrb-bridge",
        ("redis://127.0.0.1:notaport/0",),
        2,
        ("redis://127.0.0.1:notaport/0",),
    ),
    Case("bridge-url-without-scheme", "rrb-bridge", ("127.0.0.1:6379",), 2, ("127.0.0.1:6379",)),
    Case(
        "status-unknown-url-scheme",
        "rrb-status",
        ("http://127.0.0.1:{src_port}/0",),
        2,
        ("http://127.0.0.1:{src_port}/0",),
    ),
    Case(
        "status-db-not-a-number",
        "rrb-status",
        ("redis://127.0.0.1:{src_port}/abc",),
        2,
        ("redis://127.0.0.1:{src_port}/abc",),
    ),
    Case(
        "bridge-bad-stream-url",
        "rrb-bridge",
        ("{src}", "--stream-url", f"redis://:{WRONG}@127.0.0.1:{{src_port}}/zz"),
        2,
        ("redis://:***@127.0.0.1:{src_port}/zz",),
        secrets=(WRONG,),
    ),
    Case(
        "upload-unknown-storage-scheme",
        "rrb-upload",
        ("{src}", "--storage", "gcs://bucket/x"),
        2,
        ("gcs://bucket/x",),
    ),
    Case(
        "upload-file-url-with-host",
        "rrb-upload",
        ("{src}", "--storage", "file://host/x"),
        2,
        ("file://host/x",),
    ),
    Case(
        "upload-bad-bucket-name",
        "rrb-upload",
        ("{src}", "--storage", "s3://Bad_Bucket/x"),
        2,
        ("Bad_Bucket",),
        env=S3_ENV,
    ),
    Case(
        "upload-s3-endpoint-not-http",
        "rrb-upload",
        ("{src}", "--storage", "s3://some-bucket/x"),
        2,
        ("ftp://127.0.0.1:9",),
        env={**S3_ENV, "S3_SERVER": "ftp://127.0.0.1:9"},
    ),
    Case(
        "restore-bad-at",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--at", "yesterday"),
        2,
        ("--at", "yesterday"),
    ),
    Case(
        "restore-negative-at",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--at=-5"),
        2,
        ("--at", "-5"),
    ),
    Case(
        "upload-concurrency-0",
        "rrb-upload",
        ("{src}", "--storage", "{backup}", "-c", "0"),
        2,
        ("--concurrency 0",),
    ),
    Case(
        "restore-concurrency-0",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "-c", "0"),
        2,
        ("--concurrency 0",),
    ),
    Case("rrb-concurrency-not-a-number", "rrb", ("{src}", "-c", "many"), 2, ("'many'",)),
    Case("rrb-unknown-option", "rrb", ("{src}", "--frobnicate"), 2, ("--frobnicate",)),
    Case("bridge-extra-argument", "rrb-bridge", ("{src}", "extra"), 2, ("extra",)),
    Case(
        "restore-db-with-legacy",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--db", "1", "--format", "legacy"),
        2,
        ("--db", "--format legacy"),
    ),
    Case(
        "restore-url-db-without-db",
        "rrb-restore",
        ("redis://127.0.0.1:{src_port}/3", "--storage", "{backup}"),
        2,
        ("redis://127.0.0.1:{src_port}/3", "--db"),
    ),
    Case(
        "restore-bad-if-exists",
        "rrb-restore",
        ("{src}", "--storage", "{backup}", "--if-exists", "maybe"),
        2,
        ("--if-exists", "'maybe'"),
    ),
    Case(
        "upload-negative-claim-idle",
        "rrb-upload",
        ("{src}", "--storage", "{backup}", "--claim-idle", "-1"),
        2,
        ("--claim-idle -1",),
    ),
    Case(
        "rrb-negative-grace",
        "rrb",
        ("{src}", "--storage", "{backup}", "--grace", "-1"),
        2,
        ("--grace -1",),
    ),
    Case(
        "rrb-metrics-port-out-of-range",
        "rrb",
        ("{src}", "--storage", "{backup}", "--metrics-port", "70000"),
        2,
        ("--metrics-port '70000'",),
    ),
    Case(
        "restore-bad-metrics-port-variable",
        "rrb-restore",
        ("{src}", "--storage", "{backup}"),
        2,
        ("RRB_METRICS_PORT 'http'",),
        env={"RRB_METRICS_PORT": "http"},
    ),
    Case(
        "upload-negative-linger",
        "rrb-upload",
        ("{src}", "--storage", "{backup}", "--linger", "-1"),
        2,
        ("--linger -1",),
    ),
    Case("bridge-empty-pattern", "rrb-bridge", ("{src}", "-r", ""), 2, ("--redis-pattern",)),
    Case(
        "bridge-bad-log-level",
        "rrb-bridge",
        ("{src}",),
        2,
        ("LOG_LEVEL", "'LOUD'"),
        env={"LOG_LEVEL": "LOUD"},
    ),
    Case(
        "status-bad-redis-server-variable",
        "rrb-status",
        (),
        2,
        ("redis://127.0.0.1:{src_port}/x",),
        env={"REDIS_SERVER": "redis://127.0.0.1:{src_port}/x"},
    ),
    # An empty Redis: no bridge has run there, or the URL, db or prefix is wrong.
    Case("status-no-stream", "rrb-status", ("{src}",), 1, ("'rrb:changes'", "{src}")),
    Case(
        "status-no-stream-own-prefix",
        "rrb-status",
        ("{src}", "--own-prefix", "other:"),
        1,
        ("'other:changes'", "--own-prefix"),
    ),
]


def _verify_cases() -> list[Case]:
    """``rrb-verify`` cases, when the command is installed."""
    if not (BIN / "rrb-verify").exists():
        return []
    return [
        Case("verify-unreachable", "rrb-verify", (CLOSED, "--storage", "{backup}"), 1, (CLOSED,)),
        Case(
            "verify-missing-folder",
            "rrb-verify",
            ("{src}", "--storage", "{root}/no-such-backup"),
            1,
            ("{root}/no-such-backup",),
        ),
        Case(
            "verify-unknown-storage-scheme",
            "rrb-verify",
            ("{src}", "--storage", "gcs://bucket/x"),
            2,
            ("gcs://bucket/x",),
        ),
    ]


ALL_CASES = CASES + _verify_cases()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[World]:
    """Three Redis servers with keys in them, a folder with a backup, a file, moto."""
    tmp = tmp_path_factory.mktemp("bad-input")
    servers = [
        RedisServer(tmp / "redis-src"),
        RedisServer(tmp / "redis-noconfig", "--rename-command", "CONFIG", ""),
        RedisServer(tmp / "redis-auth"),
    ]
    try:
        src, noconfig, auth = (s.start() for s in servers)
        root = tmp / "work"
        root.mkdir()
        backup = root / "backup"
        with src.client() as c:
            # Backed-up keys that are not in the source: a restore that ran would bring them back.
            c.mset({f"backed:{i}": f"value-{i}" for i in range(5)})
            storage = FsStorage(backup)
            anyio.run(backup_keys, c, storage)
            anyio.run(storage.close)
            c.flushall()
            c.mset({f"live:{i}": f"value-{i}" for i in range(5)})
        with src.client(3) as c:
            c.set("in-db-3", "x", ex=3600)
        with noconfig.client() as c:
            c.set("live", "x")
        with auth.client() as c:
            c.set("live", "x")
            c.config_set("requirepass", PASSWORD)
        file = root / "a-file"
        file.write_text("not a folder\n")
        yield World(src, noconfig, auth, free_port(), root, backup, file, moto_endpoint)
    finally:
        for s in servers:
            s.kill()


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(world: World, case: Case) -> None:
    before = state(world)
    outcome = run(world, case)
    after = state(world)

    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert len(lines) == 1, outcome.output
    line = lines[0]
    assert outcome.status == case.status, line
    assert outcome.seconds < 10, f"took {outcome.seconds:.1f} s: {line}"
    assert "Traceback" not in outcome.output
    for needle in case.needles:
        assert world.fill(needle) in line, line
    for secret in (*case.secrets, PASSWORD):
        assert secret not in outcome.output
    if case.status:
        assert line.startswith(f"{case.command}: error: "), line
    assert after == before


def test_debug_shows_the_traceback_and_still_ends_with_the_one_line(world: World) -> None:
    case = Case("status-unreachable-debug", "rrb-status", ("--debug", CLOSED), 1, (CLOSED,))
    outcome = run(world, case)
    assert outcome.status == 1
    assert "Traceback" in outcome.output
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert lines[-1].startswith("rrb-status: error: cannot reach stream Redis"), lines[-1]
    assert world.fill(CLOSED) in lines[-1]


def test_the_table_covers_every_command() -> None:
    commands = {c.command for c in ALL_CASES}
    assert {"rrb", "rrb-bridge", "rrb-upload", "rrb-status", "rrb-restore"} <= commands
    assert len(ALL_CASES) >= 24
