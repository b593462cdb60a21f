"""The original tool's objects: names and bodies, including the keys its own reader broke."""

from __future__ import annotations

import hashlib

import pytest

from rrb_streams.errors import CorruptObject
from rrb_streams.format.layout import latest_name, version_name
from rrb_streams.format.legacy import (
    LegacyName,
    decode_legacy,
    encode_legacy,
    legacy_name,
    parse_legacy_name,
)

H = hashlib.sha256(b"user:1").hexdigest()

VALUES = [
    b"",
    b"v",
    b"#",
    b"###",
    b"12#34#",
    b"0123456789" * 3,
    bytes(range(256)),
    b"\x00\n\r\xff#9#",
]


# --- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("klen", range(1, 101))
def test_round_trip_every_key_length(klen: int) -> None:
    key = bytes((i * 37 + 11) % 256 for i in range(klen))
    for value in VALUES:
        assert decode_legacy(encode_legacy(key, value)) == (key, value)


@pytest.mark.parametrize("klen", [9, 10, 11, 99, 100])
@pytest.mark.parametrize("value", VALUES)
def test_keys_around_digit_boundaries(klen: int, value: bytes) -> None:
    """The original reader cut the header at the wrong '#' once a length had two digits."""
    for key in (b"k" * klen, b"#" * klen, b"1#" * (klen // 2) + b"9" * (klen % 2)):
        assert len(key) == klen
        body = encode_legacy(key, value)
        assert body.startswith(b"%d#%d#" % (klen, len(value)))
        assert decode_legacy(body) == (key, value)


def test_empty_key_and_large_value() -> None:
    value = b"#x" * 100_000
    assert decode_legacy(encode_legacy(b"", value)) == (b"", value)


def test_body_layout_is_exact() -> None:
    assert encode_legacy(b"user:1", b"hello#world") == b"6#11#user:1hello#world"
    assert decode_legacy(b"6#11#user:1hello#world") == (b"user:1", b"hello#world")
    assert decode_legacy(b"0#0#") == (b"", b"")
    assert decode_legacy(b"007#0#abcdefg") == (b"abcdefg", b"")


def test_returns_plain_bytes_from_a_bytes_like_body() -> None:
    key, value = decode_legacy(bytes(bytearray(b"1#2#kvv")))
    assert (type(key), type(value)) == (bytes, bytes)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"#",
        b"##",
        b"5",
        b"5#",
        b"5#3",
        b"#3#abc",
        b"3##abc",
        b"+3#0#abc",
        b"-3#0#abc",
        b"3#-0#abc",
        b"3#+0#abc",
        b" 3#0#abc",
        b"3 #0#abc",
        b"3# 0#abc",
        b"3#0 #abc",
        b"0x3#0#abc",
        b"3.0#0#abc",
        b"\xd9\xa3#0#abc",  # ARABIC-INDIC DIGIT THREE in UTF-8
        b"3:0:abc",
        b"abc",
        b"\x89RRB\x01\x00",
        b"1" * 21 + b"#0#",
        b"0#" + b"1" * 21 + b"#",
        b"0" * 21 + b"3#0#abc",
    ],
)
def test_rejects_malformed_headers(body: bytes) -> None:
    with pytest.raises(CorruptObject, match=r"^db0/x\.backup: "):
        decode_legacy(body, "db0/x.backup")


def test_twenty_digit_lengths_are_still_parsed() -> None:
    with pytest.raises(CorruptObject, match="header says 0\\+99999999999999999999 bytes"):
        decode_legacy(b"0#" + b"9" * 20 + b"#")


@pytest.mark.parametrize(
    "body",
    [
        b"6#11#user:1hello#worl",  # one byte short
        b"6#11#user:1",  # value missing
        b"6#11#",  # nothing after the header
        b"6#11#user:1hello#world!",  # one byte extra
        b"6#11#user:1hello#world\n",  # a trailing newline is damage too
        b"6#0#user:1x",
        b"0#0#x",
        b"10#1#abcdefghi",  # the shape the original reader misread
    ],
)
def test_rejects_size_mismatch(body: bytes) -> None:
    with pytest.raises(CorruptObject, match=r"^obj: header says \d+\+\d+ bytes follow, object has"):
        decode_legacy(body, "obj")


def test_every_truncation_is_detected() -> None:
    body = encode_legacy(b"k" * 12, b"v#1#" * 5)
    for cut in range(len(body)):
        with pytest.raises(CorruptObject):
            decode_legacy(body[:cut])


def test_default_name_in_message() -> None:
    with pytest.raises(CorruptObject, match=r"^<object>: empty object$"):
        decode_legacy(b"")


# --- names ----------------------------------------------------------------------------------


def test_unversioned_name() -> None:
    assert parse_legacy_name(f"{H}.backup") == LegacyName(H, None)


def test_versioned_name() -> None:
    assert parse_legacy_name(f"1700000000.{H}.backup") == LegacyName(H, 1700000000)
    assert parse_legacy_name(f"0.{H}.backup") == LegacyName(H, 0)


@pytest.mark.parametrize("prefix", ["", "backups/", "a/b/c/"])
def test_names_under_a_prefix(prefix: str) -> None:
    assert parse_legacy_name(f"{prefix}{H}.backup", prefix) == LegacyName(H, None)
    assert parse_legacy_name(f"{prefix}42.{H}.backup", prefix) == LegacyName(H, 42)


def test_writer_and_parser_agree() -> None:
    key = b"user:1"
    assert legacy_name(key) == f"{H}.backup"
    assert legacy_name(key, 1700000000, "p/") == f"p/1700000000.{H}.backup"
    parsed = parse_legacy_name(legacy_name(key, 7, "p/"), "p/")
    assert parsed == LegacyName(hashlib.sha256(key).hexdigest(), 7)


def test_name_is_frozen() -> None:
    name = LegacyName(H, None)
    with pytest.raises(AttributeError):
        name.seconds = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        (f"{H}.backup", "backups/"),  # missing prefix
        (f"other/{H}.backup", "backups/"),  # wrong prefix
        (f"backups/{H}.backup", ""),  # nested below where we look
        (f"backups/x/{H}.backup", "backups/"),  # nested below the prefix
        (f"backups/1/{H}.backup", "backups/"),
        (f"/{H}.backup", ""),
        (f"{H.upper()}.backup", ""),
        (f"{H[:-1]}A.backup", ""),
        (f"{H[:63]}.backup", ""),
        (f"{H}0.backup", ""),
        (f"{H[:63]}g.backup", ""),
        (f"{H}.BACKUP", ""),
        (f"{H}.backup.tmp", ""),
        (f"{H}.tombstone", ""),
        (f"{H}", ""),
        (f"{H}.backup/", ""),
        (f" {H}.backup", ""),
        (f"{H}.backup\n", ""),
        (f"-1.{H}.backup", ""),
        (f"+1.{H}.backup", ""),
        (f"1.5.{H}.backup", ""),
        (f".{H}.backup", ""),
        (f"1e9.{H}.backup", ""),
        (f"\u0661\u0662.{H}.backup", ""),  # ARABIC-INDIC digits
        (f"\uff11\uff12.{H}.backup", ""),  # FULLWIDTH digits
        (f"{'1' * 21}.{H}.backup", ""),
        (f"1700000000_{H}.backup", ""),
        (f"1700000000.{H}.{H}.backup", ""),
        ("", ""),
        (".backup", ""),
    ],
)
def test_rejects_other_names(name: str, prefix: str) -> None:
    assert parse_legacy_name(name, prefix) is None


def test_rejects_our_own_names() -> None:
    for prefix in ("", "p/"):
        for name in (
            latest_name(prefix, 0, b"user:1"),
            version_name(prefix, 0, b"user:1", 1_700_000_000_000_000, tombstone=False),
            version_name(prefix, 3, b"user:1", 1_700_000_000_000_000, tombstone=True),
            f"{prefix}db0/{H[:2]}/{H}.backup",
        ):
            assert parse_legacy_name(name, prefix) is None, name
