"""The ``--at TIME`` option of ``rrb-restore``: a point in time, in microseconds since 1970 UTC.

``parse_at`` accepts, after trimming surrounding whitespace:

- Unix seconds: ASCII digits with an optional fraction, ``1764000000`` or ``1764000000.25``.
  No sign, exponent, ``nan`` or ``inf``. A bare number is always Unix seconds, never a
  compact ISO date.
- ISO-8601 as ``datetime.fromisoformat`` reads it: ``2026-11-24T03:00:00Z``, an offset
  (``+01:00``), ``T`` or a space between date and time, fractional seconds, a date alone
  (midnight). A time without an offset is UTC, not the local time zone, so the same
  command means the same instant on every host.

Digits beyond the microsecond are dropped (rounded down), in both forms: versions are
stamped in whole microseconds, so a version read at or before the given instant is one
read at or before its rounded-down microsecond. The conversion is integer arithmetic
throughout, never a float. Times before 1970 or after year 9999 are refused.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from rrb_streams.errors import ConfigError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC) - _EPOCH) // _ONE_US
_UNIX = re.compile(r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?", re.ASCII)


def _invalid(text: str, why: str) -> ConfigError:
    return ConfigError(f"invalid --at {text!r}: {why}")


def _unix_us(whole: str, frac: str | None) -> int | None:
    # Longer than max seconds (12 digits) even after leading zeros: out of range, and too
    # long for int() to be worth calling.
    whole = whole.lstrip("0") or "0"
    if len(whole) > 12:
        return None
    return int(whole) * 1_000_000 + int((frac or "")[:6].ljust(6, "0"))


def parse_at(text: str) -> int:
    """Microseconds since the Unix epoch for an ``--at`` value. Raises ``ConfigError``.

    See the module docstring for the accepted forms.
    """
    s = text.strip()
    m = _UNIX.fullmatch(s)
    if m is not None:
        us = _unix_us(m["int"], m["frac"])
    else:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise _invalid(
                text, "expected ISO-8601 (2026-11-24T03:00:00Z) or Unix seconds (1764000000.5)"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        us = (dt - _EPOCH) // _ONE_US
    if us is None or us > _MAX_US:
        raise _invalid(text, f"after {format_at(_MAX_US)}")
    if us < 0:
        raise _invalid(text, f"before {format_at(0)}")
    return us


def format_at(us: int) -> str:
    """``us`` (microseconds since the epoch, 0 to year 9999) as UTC ISO-8601 ending in ``Z``.

    Microseconds are shown only when not zero: ``2026-11-24T03:00:00Z``,
    ``2026-11-24T03:00:00.250000Z``. ``parse_at`` reads it back to the same number.
    """
    if not 0 <= us <= _MAX_US:
        raise ValueError(f"{us} microseconds is outside 1970 to 9999")
    dt = (_EPOCH + us * _ONE_US).replace(tzinfo=None)
    return dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds") + "Z"
