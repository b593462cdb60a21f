"""The change stream's entries: what the bridge adds, and what uploaders parse.

An entry records that a key may have changed; it never carries a value::

    XADD {own}changes * db <int> key <raw bytes> ev <event name> t <bridge ms>

``ev`` is the keyspace event (``set``, ``del``, ``expired``, …), ``scan`` for an entry that
a gap rescan wrote, or ``verify`` for one that ``rrb-verify --repair`` queued. Uploaders read
the key's *current* state whatever the event says, so a lost or reordered event name can never
make the backup wrong.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

SCAN_EVENT = "scan"

#: One entry still to be added: (db, raw key, event, time in ms). A plain tuple, because the
#: bridge makes one per keyspace event.
NewEntry = tuple[int, bytes, str, int]


class Change(NamedTuple):
    """One parsed change-stream entry."""

    id: str
    db: int
    key: bytes
    event: str
    time_ms: int


def now_ms() -> int:
    """This host's wall clock in milliseconds, as stamped into entries."""
    return time.time_ns() // 1_000_000


def entry_fields(db: int, key: bytes, event: str, time_ms: int) -> dict[bytes, bytes]:
    """The fields of the XADD for one change."""
    return {b"db": b"%d" % db, b"key": key, b"ev": event.encode(), b"t": b"%d" % time_ms}


def entry_pairs(db: int, key: bytes, event: str, time_ms: int) -> tuple[bytes, ...]:
    """:func:`entry_fields` as the flat field/value list an XADD takes: the bridge's hot path."""
    return (b"db", b"%d" % db, b"key", key, b"ev", event.encode(), b"t", b"%d" % time_ms)


def parse_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> Change:
    """Parse one XREADGROUP / XAUTOCLAIM entry. Raises ``ValueError`` on a foreign entry."""
    try:
        return Change(
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            db=int(fields[b"db"]),
            key=bytes(fields[b"key"]),
            event=fields.get(b"ev", b"").decode(errors="replace"),
            time_ms=int(fields.get(b"t", b"0")),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed change entry {entry_id!r}: {exc}") from exc


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """``"1700000000000-3"`` as ``(1700000000000, 3)``, for ordering entry ids."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: bytes | str) -> str:
    """The smallest entry id strictly greater than ``entry_id``."""
    ms, seq = id_tuple(entry_id)
    return f"{ms}-{seq + 1}"
