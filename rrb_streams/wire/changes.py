"""The change stream: entry format, rrb's own key names, the consumer group and trimming.

An entry records that a key may have changed; it never carries a value::

    XADD {own}changes * db <int> key <raw bytes> ev <event name> t <bridge ms>

``ev`` is the keyspace event (``set``, ``del``, ``expired``, …) or ``scan`` for an entry that
a gap rescan wrote. Uploaders read the key's *current* state whatever the event says, so a
lost or reordered event name can never make the backup wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

DEFAULT_OWN_PREFIX = "rrb:"
DEFAULT_GROUP = "rrb-upload"
SCAN_EVENT = "scan"


@dataclass(frozen=True, slots=True)
class OwnKeys:
    """Names of every key rrb-streams itself keeps in Redis, all under one prefix."""

    prefix: str = DEFAULT_OWN_PREFIX

    @property
    def stream(self) -> str:
        """The change stream the bridge writes and uploaders read."""
        return f"{self.prefix}changes"

    @property
    def dead(self) -> str:
        """Entries that kept failing, with their reason."""
        return f"{self.prefix}dead"

    def lease(self, db: int, key_hash: str) -> str:
        """Per-key lease an uploader holds around read + write (last write wins)."""
        return f"{self.prefix}lease:{db}:{key_hash}"

    def done(self, db: int, key_hash: str) -> str:
        """The newest entry id whose change is already in storage for this key."""
        return f"{self.prefix}done:{db}:{key_hash}"

    def index(self, db: int) -> str:
        """The stored-keys index of ``db``: a hash of raw key to the digest of its stored state."""
        return f"{self.prefix}index:{db}"

    @property
    def leader(self) -> str:
        """The bridges' leader lease: the token of the one bridge that may write the stream."""
        return f"{self.prefix}bridge:leader"

    def is_own(self, key: bytes) -> bool:
        """Whether ``key`` is one of ours and must never be backed up."""
        return key.startswith(self.prefix.encode())


@dataclass(frozen=True, slots=True)
class Change:
    """One parsed change-stream entry."""

    id: str
    db: int
    key: bytes
    event: str
    time_ms: int


def entry_fields(db: int, key: bytes, event: str, time_ms: int) -> dict[bytes, bytes]:
    """The fields of the XADD for one change."""
    return {b"db": b"%d" % db, b"key": key, b"ev": event.encode(), b"t": b"%d" % time_ms}


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


async def ensure_group(r: Redis, stream: str, group: str) -> None:
    """Create the stream and the group (reading from the start) unless they exist. Idempotent."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def safe_trim_id(r: Redis, stream: str) -> str | None:
    """The lowest id that every group still needs, or ``None`` when nothing may be trimmed.

    For each group that is its oldest pending (delivered, unacked) entry, or the entry after the
    last one it was delivered when none is pending. Entries below the minimum over all groups
    are acked by everyone and safe to drop. With no group at all nothing is trimmed: an entry no
    group has read is still owed to someone.
    """
    try:
        groups: list[dict[str, Any]] = await r.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    if not groups:
        return None
    needed: list[tuple[int, int]] = []
    for g in groups:
        name = g["name"]
        after_delivered = id_tuple(next_id(g["last-delivered-id"]))
        if g.get("pending", 0):
            summary = await r.xpending(stream, name)
            # Acked since XINFO: nothing is pending below what the group had been delivered.
            needed.append(id_tuple(summary["min"]) if summary["min"] else after_delivered)
        else:
            needed.append(after_delivered)
    ms, seq = min(needed)
    return f"{ms}-{seq}"


async def trim(r: Redis, stream: str) -> int:
    """Drop entries every group has acked (``XTRIM MINID``). Returns how many went."""
    minid = await safe_trim_id(r, stream)
    if minid is None:
        return 0
    return int(await r.xtrim(stream, minid=minid, approximate=False))
