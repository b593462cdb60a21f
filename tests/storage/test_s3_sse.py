"""S3 server-side encryption: what the options send, and what is refused as bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rrb_streams.cli.backup import rrb, upload
from rrb_streams.errors import ConfigError
from rrb_streams.storage.encrypted import AgeStorage
from rrb_streams.storage.s3 import S3Storage
from rrb_streams.storage.url import open_storage, parse_storage_url, with_sse
from tests.support.moto import boto_client


@pytest.mark.anyio
@pytest.mark.parametrize("multipart", [False, True], ids=["put", "multipart"])
@pytest.mark.parametrize(
    ("sse", "key_id"),
    [("AES256", None), ("aws:kms", None), ("aws:kms", "alias/rrb-backup")],
)
async def test_objects_are_written_with_the_chosen_encryption(
    s3_bucket: str, moto_endpoint: str, sse: str, key_id: str | None, multipart: bool
) -> None:
    spec = with_sse(parse_storage_url(f"s3://{s3_bucket}/base"), sse, key_id, env={})
    assert (spec.sse, spec.sse_kms_key_id) == (sse, key_id)
    opened = open_storage(spec)
    assert isinstance(opened, AgeStorage)  # with no keys: passes objects through
    storage = opened.inner
    assert isinstance(storage, S3Storage)
    if multipart:
        storage.multipart_threshold = 10  # a one-part multipart upload for 100 bytes
    try:
        await storage.put("a/object", b"x" * 100)
        assert await storage.get("a/object") == b"x" * 100
    finally:
        await storage.close()
    head = boto_client(moto_endpoint).head_object(Bucket=s3_bucket, Key="base/a/object")
    assert head["ServerSideEncryption"] == sse
    if key_id is not None:
        assert key_id in head["SSEKMSKeyId"]


@pytest.mark.anyio
async def test_without_the_option_no_encryption_header_is_sent(
    s3_bucket: str, moto_endpoint: str
) -> None:
    storage = open_storage(parse_storage_url(f"s3://{s3_bucket}/base"))
    try:
        await storage.put("plain", b"data")
    finally:
        await storage.close()
    head = boto_client(moto_endpoint).head_object(Bucket=s3_bucket, Key="base/plain")
    assert head.get("ServerSideEncryption") in (None, "AES256")  # the bucket's default applies
    assert "SSEKMSKeyId" not in head


def test_the_environment_supplies_defaults_and_flags_win() -> None:
    spec = parse_storage_url("s3://bucket/base", env={})
    env = {"S3_SSE": "aws:kms", "S3_SSE_KMS_KEY_ID": "key-1"}
    assert with_sse(spec, env=env).sse_kms_key_id == "key-1"
    assert with_sse(spec, "AES256", env={"S3_SSE": "aws:kms"}).sse == "AES256"
    assert with_sse(spec, env={}) == spec
    assert "secret" not in repr(with_sse(spec, "AES256", env={}))


@pytest.mark.parametrize(
    ("storage", "sse", "key_id", "needle"),
    [
        ("s3://bucket/base", "aes256", None, "invalid --s3-sse (or S3_SSE) 'aes256'"),
        ("s3://bucket/base", "none", None, "expected AES256 or aws:kms"),
        ("s3://bucket/base", None, "key-1", "invalid --s3-sse (or S3_SSE) none"),
        ("s3://bucket/base", "AES256", "key-1", "a KMS key needs --s3-sse aws:kms"),
        ("/some/folder", "AES256", None, "apply to s3:// storage only, not file:///some/folder"),
    ],
)
def test_bad_encryption_options_are_config_errors(
    storage: str, sse: str | None, key_id: str | None, needle: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        with_sse(parse_storage_url(storage, env={}), sse, key_id, env={})
    assert needle in str(raised.value)


@pytest.mark.parametrize("command", [rrb, upload])
def test_the_commands_refuse_bad_encryption_options_with_exit_2(
    command: Callable[[list[str]], int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["redis://127.0.0.1:1/0", "--storage", "s3://bucket/base", "--s3-sse", "AES-256"]
    assert command(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "invalid --s3-sse (or S3_SSE) 'AES-256'" in err[0]

    monkeypatch.setenv("S3_SSE", "AES256")
    assert command(["redis://127.0.0.1:1/0", "--storage", str(tmp_path)]) == 2
    assert "apply to s3:// storage only" in capsys.readouterr().err
