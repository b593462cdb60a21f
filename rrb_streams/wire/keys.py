"""rrb's own names in Redis: its keys, all under one prefix (``rrb:`` by default), and the
names of its consumer groups and consumers.

Names only: nothing here talks to Redis. Keys under the prefix are never backed up, and a
restore never writes them into a target.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

DEFAULT_OWN_PREFIX = "rrb:"

#: The uploaders' group on the change stream; the bridge creates it, so entries are kept for it.
DEFAULT_GROUP = "rrb-upload"


def default_consumer() -> str:
    """``<hostname>-<pid>``: unique per process, readable in ``rrb-status``."""
    return f"{socket.gethostname()}-{os.getpid()}"


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
    def stamp(self) -> str:
        """The ordering-stamp clock: every lease taken draws a stamp above all earlier ones."""
        return f"{self.prefix}stamp"

    @property
    def leader(self) -> str:
        """The bridges' leader lease: the token of the one bridge that may write the stream."""
        return f"{self.prefix}bridge:leader"

    def is_own(self, key: bytes) -> bool:
        """Whether ``key`` is one of ours and must never be backed up."""
        return key.startswith(self.prefix.encode())
