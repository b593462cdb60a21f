"""Option defaults come from the settings classes: a command run without options builds the
same settings as the class's own defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from rrb_streams.cli import backup, options, restore
from rrb_streams.config import BridgeConfig, RestoreConfig, UploadConfig, default


def test_default_reads_plain_and_factory_defaults() -> None:
    assert default(UploadConfig, "linger") == 0.1
    assert default(BridgeConfig, "leader_lease") == 10.0
    assert isinstance(default(UploadConfig, "consumer"), str)  # a default_factory
    with pytest.raises(KeyError, match="no default"):
        default(UploadConfig, "source_url")
    with pytest.raises(KeyError, match="no field"):
        default(UploadConfig, "no_such_field")


def _parsed(add: list[object], argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("url", nargs="?")
    for adder in add:
        assert callable(adder)
        adder(p)
    return p.parse_args(argv)


def _fields(cfg: object, skip: set[str]) -> dict[str, object]:
    assert dataclasses.is_dataclass(cfg)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def test_backup_options_without_flags_build_the_default_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("REDIS_TLS_CA", "REDIS_TLS_CERT", "REDIS_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    url = "redis://127.0.0.1:6379/0"
    args = _parsed(
        [
            options.add_stream,
            options.add_bridge,
            lambda p: options.add_upload(p, "workers"),
            options.add_tls,
        ],
        [url],
    )
    assert _fields(backup._bridge_config(args), set()) == _fields(
        BridgeConfig(source_url=url).validate(), set()
    )
    assert _fields(backup._upload_config(args), {"consumer"}) == _fields(
        UploadConfig(source_url=url).validate(), {"consumer"}
    )


def test_restore_options_without_flags_build_the_default_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("REDIS_TLS_CA", "REDIS_TLS_CERT", "REDIS_TLS_KEY", "S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    url = "redis://127.0.0.1:6379/0"
    args = restore._parser().parse_args([url])
    built = restore._config(args)
    expected = RestoreConfig(target_url=url, storage=built.storage).validate()
    assert _fields(built, {"consumer"}) == _fields(expected, {"consumer"})
