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
    #: In a Redis Cluster every name carries one hash tag, the prefix in braces
    #: (``rrb:{rrb:}changes``), so all of them live in one slot: a script or a transaction
    #: over several of them never spans slots. They still start with the prefix.
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.cluster and ("{" in self.prefix or "}" in self.prefix):
            raise ValueError(f"own prefix {self.prefix!r}: no braces with a Redis Cluster")

    def name(self, suffix: str) -> str:
        """The own key ``suffix``: under the prefix, and in the own slot in a cluster."""
        if self.cluster:
            return f"{self.prefix}{{{self.prefix}}}{suffix}"
        return f"{self.prefix}{suffix}"

    @property
    def slot_tag(self) -> bytes:
        """A key of the own slot (what CLUSTER KEYSLOT hashes for every own name)."""
        return self.name("").encode()

    @property
    def stream(self) -> str:
        """The change stream the bridge writes and uploaders read."""
        return self.name("changes")

    @property
    def dead(self) -> str:
        """Entries that kept failing, with their reason."""
        return self.name("dead")

    def lease(self, db: int, key_hash: str) -> str:
        """Per-key lease an uploader holds around read + write (last write wins)."""
        return self.name(f"lease:{db}:{key_hash}")

    def done(self, db: int, key_hash: str) -> str:
        """The newest entry id whose change is already in storage for this key."""
        return self.name(f"done:{db}:{key_hash}")

    def index(self, db: int) -> str:
        """The stored-keys index of ``db``: a hash of raw key to the digest of its stored state."""
        return self.name(f"index:{db}")

    @property
    def stamp(self) -> str:
        """The ordering-stamp clock: every lease taken draws a stamp above all earlier ones."""
        return self.name("stamp")

    @property
    def leader(self) -> str:
        """The bridges' leader lease: the token of the one bridge that may write the stream."""
        return self.name("bridge:leader")

    def is_own(self, key: bytes) -> bool:
        """Whether ``key`` is one of ours and must never be backed up."""
        return key.startswith(self.prefix.encode())
