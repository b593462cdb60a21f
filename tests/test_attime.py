"""``--at TIME``: Unix seconds or ISO-8601 to exact microseconds, and back."""

from __future__ import annotations

import random

import pytest

from rrb_streams.attime import format_at, parse_at
from rrb_streams.errors import ConfigError

T = 1_795_489_200_000_000  # 2026-11-24T03:00:00Z
MAX = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("0", 0),
        ("1", 1_000_000),
        ("1700000000", 1_700_000_000_000_000),
        ("1700000000.25", 1_700_000_000_250_000),
        ("1700000000.5", 1_700_000_000_500_000),
        ("1700000000.000001", 1_700_000_000_000_001),
        ("1700000000.999999", 1_700_000_000_999_999),
        ("1700000000.100000", 1_700_000_000_100_000),
        ("1700000000.0", 1_700_000_000_000_000),
        ("1700000000.0000009", 1_700_000_000_000_000),  # below a microsecond: dropped
        ("1700000000.123456789", 1_700_000_000_123_456),
        ("0.000001", 1),
        ("01700000000", 1_700_000_000_000_000),
        ("000000000000001700000000", 1_700_000_000_000_000),
        ("9007199254.740993", 9_007_199_254_740_993),  # a float would round this
        ("253402300799.999999", MAX),
        ("  1700000000\n", 1_700_000_000_000_000),
    ],
)
def test_unix_seconds(text: str, us: int) -> None:
    assert parse_at(text) == us


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("2026-11-24T03:00:00Z", T),
        ("2026-11-24T03:00:00+00:00", T),
        ("2026-11-24T04:00:00+01:00", T),
        ("2026-11-23T22:00:00-05:00", T),
        ("2026-11-24T08:30:00+05:30", T),
        ("2026-11-24T03:00:00", T),  # no offset: UTC
        ("2026-11-24 03:00:00", T),
        ("2026-11-24T03:00", T),
        ("2026-11-24T03Z", T),
        ("20261124T030000Z", T),
        ("2026-11-24", T - 3 * 3600 * 1_000_000),
        ("2026-11-24T03:00:00.000001Z", T + 1),
        ("2026-11-24T03:00:00.5Z", T + 500_000),
        ("2026-11-24T03:00:00,5Z", T + 500_000),
        ("2026-11-24T03:00:00.123456789Z", T + 123_456),
        ("2026-11-24T03:00:00.25+00:00", T + 250_000),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1970-01-01", 0),
        ("9999-12-31T23:59:59.999999Z", MAX),
        (" 2026-11-24T03:00:00Z ", T),
    ],
)
def test_iso_8601(text: str, us: int) -> None:
    assert parse_at(text) == us


def test_iso_and_unix_agree() -> None:
    assert parse_at("2026-11-24T03:00:00.25Z") == parse_at("1795489200.25")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "xyz",
        "-1",
        "+1700000000",
        "-1700000000.5",
        "1e9",
        "1E9",
        "1.7e9",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1700000000.",
        ".5",
        "1_700_000_000",
        "1,700,000,000",
        "0x10",
        "\u0661\u0667\u0660\u0660",  # ARABIC-INDIC digits
        "\uff11\uff17\uff10\uff10",  # FULLWIDTH digits
        "2026-13-01",
        "2026-11-31",
        "2026-11-24T25:00:00Z",
        "2026-11-24T03:00:00+25:00",
        "2026-11-24T03:00:00 UTC",
        "24/11/2026",
        "tomorrow",
        "1700000000 1",
    ],
)
def test_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_at(text)
    assert str(err.value) == (
        f"invalid --at {text!r}: expected ISO-8601 (2026-11-24T03:00:00Z) "
        "or Unix seconds (1764000000.5)"
    )


@pytest.mark.parametrize(
    "text",
    [
        "1969-12-31T23:59:59Z",
        "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00+00:01",
        "0001-01-01",
    ],
)
def test_rejects_before_1970(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid --at .*: before 1970-01-01T00:00:00Z$"):
        parse_at(text)


@pytest.mark.parametrize(
    "text",
    ["253402300800", "9" * 13, "1" * 5000, "1" * 5000 + ".5", "9999-12-31T23:59:59-00:01"],
)
def test_rejects_after_year_9999(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid --at .*: after 9999-12-31T23:59:59\.999999Z$"):
        parse_at(text)


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:00.000001Z"),
        (T, "2026-11-24T03:00:00Z"),
        (T + 250_000, "2026-11-24T03:00:00.250000Z"),
        (T + 999_999, "2026-11-24T03:00:00.999999Z"),
        (MAX, "9999-12-31T23:59:59.999999Z"),
    ],
)
def test_format(us: int, text: str) -> None:
    assert format_at(us) == text
    assert parse_at(text) == us


@pytest.mark.parametrize("us", [-1, MAX + 1])
def test_format_refuses_out_of_range(us: int) -> None:
    with pytest.raises(ValueError, match="outside 1970 to 9999"):
        format_at(us)


def test_round_trips() -> None:
    rng = random.Random(7)
    for us in [rng.randrange(MAX + 1) for _ in range(2000)]:
        assert parse_at(format_at(us)) == us
        seconds, micro = divmod(us, 1_000_000)
        assert parse_at(f"{seconds}.{micro:06d}") == us
