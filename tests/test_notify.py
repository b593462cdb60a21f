"""notify-keyspace-events flags and keyspace channel names, without a server."""

from __future__ import annotations

import pytest

from rrb_streams.notify import (
    channel_pattern,
    extended_flags,
    missing_flags,
    parse_channel,
    suggested_value,
)


@pytest.mark.parametrize(
    ("current", "missing"),
    [
        ("", "Kg$lshzxet"),
        ("xE", "Kg$lshzet"),
        ("AK", ""),
        ("AKEm", ""),
        ("g$lshzxetK", ""),
        ("KEA", ""),
        ("A", "K"),
        ("K$", "glshzxet"),
    ],
)
def test_notify_missing_flags(current: str, missing: str) -> None:
    assert missing_flags(current) == missing


def test_notify_extension_keeps_every_existing_flag() -> None:
    assert extended_flags("xEm") == "xEmKg$lshzet"
    assert extended_flags("AKE") == "AKE"
    assert "m" not in extended_flags("") and "n" not in extended_flags("")


@pytest.mark.parametrize(
    ("current", "value"),
    [(None, "KA"), ("", "KA"), ("xE", "KAE"), ("AKEm", "KAEm"), ("dK", "KA")],
)
def test_notify_suggested_setting(current: str | None, value: str) -> None:
    assert suggested_value(current) == value


def test_notify_channel_pattern_per_db_or_all() -> None:
    assert channel_pattern(0, "*") == "__keyspace@0__:*"
    assert channel_pattern(3, "user:*") == "__keyspace@3__:user:*"
    assert channel_pattern(None, "*") == "__keyspace@*__:*"


def test_notify_parse_channel_keeps_raw_key_bytes() -> None:
    assert parse_channel(b"__keyspace@0__:plain") == (0, b"plain")
    assert parse_channel(b"__keyspace@12__:a__:b\x00\xff") == (12, b"a__:b\x00\xff")
    assert parse_channel(b"__keyspace@0__:") == (0, b"")
    assert parse_channel(b"__keyevent@0__:set") is None
    assert parse_channel(b"__keyspace@x__:k") is None
    assert parse_channel(b"other") is None
