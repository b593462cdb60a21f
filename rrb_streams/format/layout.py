"""Object names: where each key's objects live in storage.

::

    {prefix}db{db}/{h[:2]}/{h}.backup                  latest state of the key
    {prefix}db{db}/{h[:2]}/{h}/{read_at_us:017d}.backup     one version (--versioning)
    {prefix}db{db}/{h[:2]}/{h}/{read_at_us:017d}.tombstone  the key was gone at that read

``h`` is the hex SHA-256 of the raw key bytes, so any key (binary, 10 KB long) gets a short
safe name. The two-character fan-out keeps folders small on the filesystem backend. Version
names sort by the source clock's read time, so one key's history lists in order by prefix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from rrb_streams.errors import ConfigError

BACKUP_SUFFIX = ".backup"
TOMBSTONE_SUFFIX = ".tombstone"

_NAME = re.compile(
    r"^(?P<prefix>.*?)db(?P<db>\d+)/(?P<fan>[0-9a-f]{2})/(?P<hash>[0-9a-f]{64})"
    r"(?:\.backup|/(?P<version>\d{17})(?P<suffix>\.backup|\.tombstone))",
    re.ASCII,  # \d must not match other scripts' digits, which int() would accept
)


def normalize_prefix(prefix: str) -> str:
    """``/my-keys/``, ``my-keys/`` and ``my-keys`` all become ``my-keys/``; empty stays empty.

    Raises ``ConfigError`` for ``.``/``..`` segments or NUL.
    """
    parts = [p for p in prefix.strip().split("/") if p]
    if any(p in (".", "..") for p in parts) or "\x00" in prefix:
        raise ConfigError(f"invalid path prefix {prefix!r}: no '.', '..' or NUL allowed")
    return "/".join(parts) + "/" if parts else ""


def key_hash(key: bytes) -> str:
    """The hex SHA-256 of the raw key bytes."""
    return hashlib.sha256(key).hexdigest()


def key_dir(prefix: str, db: int, key: bytes) -> str:
    """The folder that holds one key's latest object and its versions folder."""
    h = key_hash(key)
    return f"{prefix}db{db}/{h[:2]}/{h}"


def latest_name(prefix: str, db: int, key: bytes) -> str:
    """The stable name of the key's latest state."""
    return key_dir(prefix, db, key) + BACKUP_SUFFIX


def version_name(prefix: str, db: int, key: bytes, read_at_us: int, *, tombstone: bool) -> str:
    """The immutable name of one version, sortable by the source-clock read time."""
    suffix = TOMBSTONE_SUFFIX if tombstone else BACKUP_SUFFIX
    return f"{key_dir(prefix, db, key)}/{read_at_us:017d}{suffix}"


def versions_prefix(prefix: str, db: int, key: bytes) -> str:
    """The listing prefix of one key's versions, oldest first."""
    return key_dir(prefix, db, key) + "/"


@dataclass(frozen=True, slots=True)
class ParsedName:
    """What an object name says without fetching it."""

    db: int
    key_hash: str
    read_at_us: int | None  # None for the latest-state object
    tombstone: bool

    @property
    def versioned(self) -> bool:
        return self.read_at_us is not None


def parse_name(name: str, prefix: str = "") -> ParsedName | None:
    """Parse one of our object names under ``prefix``; ``None`` when it is not one of ours."""
    if not name.startswith(prefix):
        return None
    m = _NAME.fullmatch(name[len(prefix) :])  # "$" would also accept a trailing "\n"
    if m is None or m["prefix"] or m["fan"] != m["hash"][:2]:
        return None
    version = m["version"]
    return ParsedName(
        db=int(m["db"]),
        key_hash=m["hash"],
        read_at_us=int(version) if version is not None else None,
        tombstone=m["suffix"] == TOMBSTONE_SUFFIX,
    )
