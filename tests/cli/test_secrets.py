"""Secrets (the Redis password, the S3 secret key, an age identity) never appear in logs,
errors, metrics or ``repr``.

The commands run as real processes with ``--debug`` and ``LOG_LEVEL=DEBUG``; everything they
print (and serve as metrics) is searched for the secrets, on a normal run, on SIGTERM, and on
refused credentials.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rrb_streams import config
from rrb_streams.crypt.keys import AgeKeys
from rrb_streams.storage.url import open_storage, parse_storage_url, with_sse
from rrb_streams.wire.tls import TlsOptions
from tests.support.age import ALICE, identity_file, identity_text
from tests.support.moto import S3_SECRET_KEY, boto_client, s3_env
from tests.support.proc import BIN, run_command
from tests.support.servers import RedisServer, child_env, free_port
from tests.support.wait import wait_for

PASSWORD = "redis-pass-do-not-log-4f1c"
WRONG_PASSWORD = "wrong-pass-do-not-log-9e2a"
IDENTITY = identity_text(ALICE)
SECRETS = (PASSWORD, WRONG_PASSWORD, S3_SECRET_KEY, IDENTITY, IDENTITY.lower(), ALICE.secret.hex())


def _assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in the output:\n{text[-3000:]}"


def _s3_env(endpoint: str) -> dict[str, str]:
    return {**s3_env(endpoint), "LOG_LEVEL": "DEBUG"}


@pytest.fixture
def locked_redis(redis_server: RedisServer) -> RedisServer:
    with redis_server.client() as c:
        c.config_set("requirepass", PASSWORD)
    return redis_server


def _url(server: RedisServer, password: str = PASSWORD) -> str:
    return f"redis://:{password}@127.0.0.1:{server.port}/0"


def _objects(moto_endpoint: str, bucket: str) -> int:
    listed = boto_client(moto_endpoint).list_objects_v2(Bucket=bucket)
    return int(listed.get("KeyCount", 0))


def _age(tmp_path: Path) -> list[str]:
    key = identity_file(tmp_path / "key.txt", ALICE)
    return ["--age-identity", str(key), "--age-recipient", str(ALICE.recipient)]


def test_a_debug_run_of_rrb_and_its_sigterm_never_print_a_secret(
    locked_redis: RedisServer, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "rrb"),
            _url(locked_redis),
            "--storage",
            f"s3://{s3_bucket}/b",
            "--debug",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--level1-every",
            "1s",
            *_age(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**_s3_env(moto_endpoint)),
    )
    try:
        with locked_redis.client() as plain:
            plain.connection_pool.connection_kwargs["password"] = PASSWORD
            wait_for(lambda: plain.exists("rrb:changes") == 1, timeout=20)
            for i in range(20):
                plain.set(f"k:{i}", i)
            plain.hset("h", mapping={"f": "v"})
            plain.delete("k:0")
            # Segments: a few objects hold every change; then every entry is acknowledged.
            wait_for(lambda: _objects(moto_endpoint, s3_bucket) >= 1, timeout=20)
            wait_for(lambda: plain.xpending("rrb:changes", "rrb-upload")["pending"] == 0)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            assert "rrb_upload" in metrics
            _assert_clean(metrics)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"upload.' in err  # the debug log was really captured
    _assert_clean(out + err)


@pytest.mark.parametrize(
    "command",
    ["rrb", "rrb-bridge", "rrb-upload", "rrb-status", "rrb-restore", "rrb-verify"],
)
def test_a_wrong_redis_password_is_refused_without_showing_it(
    locked_redis: RedisServer, s3_bucket: str, moto_endpoint: str, command: str, tmp_path: Path
) -> None:
    storage = [] if command in ("rrb-bridge", "rrb-status") else ["--storage", f"s3://{s3_bucket}"]
    if command in ("rrb", "rrb-upload"):
        storage += _age(tmp_path)
    elif command in ("rrb-restore", "rrb-verify"):
        storage += _age(tmp_path)[:2]
    result = run_command(
        command,
        _url(locked_redis, WRONG_PASSWORD),
        *storage,
        "--debug",
        env=_s3_env(moto_endpoint),
    )
    assert result.returncode == 1, result.stderr
    assert f"{command}: error:" in result.stderr
    _assert_clean(result.stdout + result.stderr)


@pytest.mark.parametrize("command", ["rrb", "rrb-upload", "rrb-restore"])
def test_an_unreachable_s3_is_one_error_without_the_secret(
    locked_redis: RedisServer, command: str
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    result = run_command(
        command, _url(locked_redis), "--storage", "s3://bucket", "--debug", env=_s3_env(gone)
    )
    assert result.returncode == 1, result.stderr
    assert f"{command}: error: cannot reach S3 endpoint {gone}" in result.stderr
    _assert_clean(result.stdout + result.stderr)


def test_an_unreachable_redis_with_a_password_is_one_line_without_it() -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:{free_port()}/0"
    result = run_command("rrb-status", url, "--debug", env={"LOG_LEVEL": "DEBUG"})
    assert result.returncode == 1
    assert "user:***@127.0.0.1" in result.stderr
    _assert_clean(result.stdout + result.stderr)


def _value_for(f: dataclasses.Field[Any]) -> Any:
    if f.name.endswith("_url"):
        return f"redis://user:{PASSWORD}@127.0.0.1:6379/0"
    if f.name == "storage":
        spec = parse_storage_url(
            "s3://bucket/base", env={"S3_ACCESS_KEY": "AK", "S3_SECRET_KEY": S3_SECRET_KEY}
        )
        spec = with_sse(spec, "aws:kms", "key-1", env={})
        return dataclasses.replace(spec, age=AgeKeys((ALICE.recipient,), (ALICE,), "/key.txt"))
    if f.name == "tls":
        return TlsOptions(ca="/ca.pem")
    raise AssertionError(f"no test value for {f.name}: teach this test about it")


def test_the_repr_of_every_config_and_storage_spec_hides_secrets() -> None:
    classes = [
        c
        for c in vars(config).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == config.__name__
    ]
    assert {"BridgeConfig", "UploadConfig", "StatusConfig", "RestoreConfig"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        values = {
            f.name: _value_for(f)
            for f in dataclasses.fields(cls)
            if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            or f.name.endswith("_url")
            or f.name == "storage"
        }
        cfg = cls(**values)
        text = repr(cfg) + str(cfg)
        assert "***" in text, text
        _assert_clean(text)

    spec = _value_for(
        next(f for f in dataclasses.fields(config.RestoreConfig) if f.name == "storage")
    )
    _assert_clean(repr(spec))
    _assert_clean(repr(open_storage(spec)))
