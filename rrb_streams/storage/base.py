"""The storage protocol every backend implements.

Names are ``/``-separated relative paths such as ``backups/db0/ab/ab12….backup``. They never
start with ``/`` and never contain ``..``, empty segments or NUL. A backend maps them below its
own root (a bucket and base prefix, a folder, a dict).

Errors are the project's own (:mod:`rrb_streams.errors`), never a library's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rrb_streams.errors import CorruptObject, ObjectNotFound

#: One object of :meth:`Storage.get_many`: its bytes, or why it has none.
Fetched = bytes | ObjectNotFound | CorruptObject


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its name (relative to the storage root) and size in bytes."""

    name: str
    size: int


class Storage(Protocol):
    """Object storage, as rrb-streams needs it.

    Every method is safe to call concurrently from many tasks.
    """

    @property
    def description(self) -> str:
        """Where objects go, safe to log: ``s3://bucket/base`` or ``file:///path``. No secrets."""
        ...

    async def check(self) -> None:
        """Verify the location exists and is usable.

        Raises ``DependencyError`` naming the bucket or folder when it is missing, unreadable or
        unreachable. Creates nothing except, for the filesystem, nothing either: the folder must
        exist or be creatable by ``put``.
        """
        ...

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing any object there.

        Atomic: a reader sees the old object or the new one, never a part. Idempotent.
        Raises ``StorageUnavailable`` for transient failures, ``ObjectRejected`` for permanent
        ones. The object is durable once :meth:`flush` has returned after this call.
        """
        ...

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        """Store the concatenation of ``chunks`` under ``name``, as :meth:`put` does, holding
        about one chunk in memory (S3: one multipart part) whatever the object's size.

        ``chunks`` is iterated once, in a worker thread, so it may do the work that makes the
        bytes (compressing them). An exception it raises fails the put, leaves no object and
        propagates. Same atomicity, errors and durability as :meth:`put`.
        """
        ...

    async def put_new(self, name: str, data: bytes) -> None:
        """:meth:`put` that never replaces: raises ``ObjectExists`` when ``name`` is taken,
        whoever took it (S3: ``If-None-Match: *``; a file: a hard link, which fails when the
        name exists). Of two writers of one name exactly one succeeds, so a sequence number
        in the name is a commit point. A retry after a lost reply may find its own object:
        callers compare the stored bytes.
        """
        ...

    async def get(self, name: str) -> bytes:
        """Return the object's bytes. Raises ``ObjectNotFound`` naming it when absent."""
        ...

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes of the object from byte ``start`` (fewer when the object
        ends first; ``b""`` when ``start`` is at or past its end).

        A negative ``start`` counts from the end: ``get_range(name, -n, n)`` is the last ``n``
        bytes (the whole object when it is shorter). Raises ``ObjectNotFound`` naming it when
        absent; ``StorageUnavailable`` for transient failures. ``length`` must be > 0
        (``ValueError`` otherwise, as for an invalid name, before any I/O).

        For readers of objects that hold many blocks: fetch the tail with the block index,
        then only the blocks needed. Each call is one request (an S3 range GET).
        """
        ...

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of the object (all of it when shorter) and its size in
        bytes, in one request: the size the bytes were cut from, whatever a listing said.

        Raises as :meth:`get_range` does. Readers of a segment's block index use it: the
        index's offsets are checked against the size (an encrypted object's plaintext size is
        only known from its stored size and its header).
        """
        ...

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        """The objects' bytes, in the order of ``names``, fetched one after another.

        An absent object gives its ``ObjectNotFound`` in its place, not raised, and an object
        storage itself finds damaged (an encrypted one that fails authentication) its
        ``CorruptObject``; any other error raises for the whole call. One request at a time,
        like :meth:`get`, but cheaper per object where a backend can batch (the filesystem
        reads them in one thread trip).
        """
        ...

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix``, once each, in ascending name
        order (bytewise on the UTF-8 names).

        Streams page by page: memory stays bounded however many objects there are.
        """
        ...

    async def delete(self, name: str) -> None:
        """Remove the object. Idempotent: deleting an absent name is not an error."""
        ...

    async def flush(self) -> None:
        """Make every ``put`` and ``delete`` that has returned durable.

        Uploaders call this once per batch, before they acknowledge the batch's entries.
        A no-op where each call is already durable when it returns (S3, memory).
        """
        ...

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise ``ValueError``."""
    if (
        not name
        or name.startswith("/")
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"invalid object name {name!r}")
    return name


def check_range(name: str, length: int) -> None:
    """Raise ``ValueError`` unless ``name`` is a valid object name and ``length`` is > 0: the
    arguments of :meth:`Storage.get_range` every backend checks before any I/O."""
    check_name(name)
    if length <= 0:
        raise ValueError(f"get_range of {name!r}: length must be > 0, not {length}")


def slice_range(data: bytes, start: int, length: int) -> bytes:
    """:meth:`Storage.get_range` of a whole object's ``data``."""
    if start < 0:
        start = max(0, len(data) + start)
    return data[start : start + length]


async def get_each(storage: Storage, names: Sequence[str]) -> list[Fetched]:
    """:meth:`Storage.get_many` for a backend with nothing to batch: one ``get`` at a time."""
    out: list[Fetched] = []
    for name in names:
        try:
            out.append(await storage.get(name))
        except (ObjectNotFound, CorruptObject) as exc:
            out.append(exc)
    return out
