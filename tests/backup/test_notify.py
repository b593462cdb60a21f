"""notify-keyspace-events flags and keyspace channel names (a server only to check globs)."""

from __future__ import annotations

import pytest
import redis

from rrb_streams.backup.notify import (
    channel_pattern,
    channel_patterns,
    extended_flags,
    missing_flags,
    parse_channel,
    suggested_value,
)
from tests.support.servers import RedisServer
from tests.support.wait import wait_for


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


def test_notify_channel_patterns_leave_other_patterns_alone() -> None:
    assert channel_patterns(0, "user:*", "rrb:") == ["__keyspace@0__:user:*"]
    assert channel_patterns(0, "*", "") == ["__keyspace@0__:*"]
    assert channel_patterns(None, "*", "é:") == ["__keyspace@*__:*"]
    assert channel_patterns(3, "*", "rrb:") == [
        "__keyspace@3__:",
        "__keyspace@3__:[^r]*",
        "__keyspace@3__:r",
        "__keyspace@3__:r[^r]*",
        "__keyspace@3__:rr",
        "__keyspace@3__:rr[^b]*",
        "__keyspace@3__:rrb",
        "__keyspace@3__:rrb[^:]*",
    ]


def received(c: redis.Redis, patterns: list[str], keys: list[bytes]) -> list[bytes]:
    """The keys whose keyspace channel in db 0 reaches a subscriber of ``patterns``, once
    per match, as the server's own glob matcher decides."""
    pubsub = c.pubsub()
    pubsub.psubscribe(*patterns)
    for _ in patterns:
        assert pubsub.get_message(timeout=5)["type"] == "psubscribe"  # type: ignore[index]
    for key in keys:
        c.publish(b"__keyspace@0__:" + key, b"set")
    c.publish(b"__keyspace@0__:end-marker", b"set")
    got: list[bytes] = []

    def reached_the_end_marker() -> bool:
        message = pubsub.get_message(timeout=1)
        if message is None:
            return False
        key = message["channel"][len(b"__keyspace@0__:") :]
        if key == b"end-marker":
            return True
        got.append(key)
        return False

    try:
        wait_for(reached_the_end_marker, timeout=5, interval=0)
    finally:
        pubsub.close()
    return got


@pytest.mark.parametrize("prefix", ["rrb:", "a*[^-]\\?x"])
def test_notify_channel_patterns_match_every_key_but_own_ones_once(
    redis_server: RedisServer, prefix: str
) -> None:
    own = prefix.encode()
    others = [b"", b"k", b"\x00\xff", own[:1], own[:-1], own[:-1] + b"Z", own[:1] + b"q" + own]
    others += [own[:i] + b"#" + own[i + 1 :] for i in range(len(own))]
    others.append(bytes([own[0] ^ 0x20]) + own[1:])  # another case: globs are exact
    mine = [own, own + b"lease:0:ab", own + own, own + b"\x00"]
    with redis_server.client() as c:
        got = received(c, channel_patterns(0, "*", prefix), others + mine)
    assert sorted(got) == sorted(k for k in others if not k.startswith(own))
