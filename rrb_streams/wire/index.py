"""The stored-keys index: which keys storage holds a live object for, and of what state.

One hash per source db on the stream Redis, ``{own}index:{db}``::

    HSET {own}index:{db} <raw key> <digest>

A field is a key that may have a live (non-tombstone) object in storage. Its value is the
:func:`digest` of the state that object holds, or :data:`UNKNOWN` (``-``) while a write may be
in flight. Only a lease holder changes a field (:mod:`rrb_streams.backup.lease`):

- before it writes or deletes a key's object it sets ``-``, so a crash between the storage call
  and the index update can never leave a digest that claims a state storage lacks (``-``
  claims nothing, so even a holder whose lease ran out may set it);
- after ``flush()`` succeeded, in the script that releases the lease and only while the lease
  is still its own, it stores the new digest, or removes the field when the key was absent.

The index answers two questions that pub/sub cannot:

- **Which deleted keys still have objects?** A key deleted while no bridge listened leaves
  nothing for a SCAN to find, but it is still a field here. The bridge's rescan walks the
  index (:func:`absent_page`) and sends every field whose key is gone as a ``scan`` change.
- **Is this key's object already up to date?** An uploader whose fresh read has the digest the
  index holds skips the PUT: a rescan uploads only the keys that changed.

The digest covers the storage target (location, path prefix, layout, ``--versioning``), so pointing
uploaders at a new location uploads every key there again. If objects disappear from storage
by other means, deleting the index hashes makes the next rescan upload every key again.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire import resp
from rrb_streams.wire.keys import OwnKeys

#: The value of a field whose object may be mid-write: its stored state is unknown.
UNKNOWN = b"-"
DIGEST_SIZE = 16  # bytes of SHA-256 kept: collisions stay out of reach, memory stays small


def storage_target(
    description: str, path_prefix: str, *, versioning: bool, layout: str = "keys"
) -> bytes:
    """Where and how an uploader's objects go, as mixed into every digest it computes: a
    switch of location, prefix, layout or ``--versioning`` uploads every key again."""
    mode = "segments" if layout == "segments" else "versions" if versioning else "latest"
    return f"{description}\x00{path_prefix}\x00{mode}".encode()


def digest(rec: KeyRecord, target: bytes) -> bytes:
    """The digest of a live key's state (type, absolute expiry, DUMP payload) at ``target``.

    Equal digests mean an object written from one read restores exactly like an object
    written from the other. The read time, entry id and Redis version do not count.
    """
    expire = -1 if rec.expire_at_ms is None else rec.expire_at_ms
    kind = rec.type.encode("ascii")
    h = hashlib.sha256()
    h.update(struct.pack(">I", len(target)))
    h.update(target)
    h.update(struct.pack(">B", len(kind)))
    h.update(kind)
    h.update(struct.pack(">qQ", expire, len(rec.payload)))
    h.update(rec.payload)
    return h.digest()[:DIGEST_SIZE]


class Stored(NamedTuple):
    """What storage durably holds for ``key`` after a write: ``digest`` of its state, or
    ``None`` when the key was absent (its latest object deleted, or a tombstone written)."""

    key: bytes
    digest: bytes | None


async def mark_unknown(r: Redis, own: OwnKeys, keys: Iterable[tuple[int, bytes]]) -> None:
    """Set every ``(db, key)`` to :data:`UNKNOWN`, in one round trip (nothing to do: none)."""
    by_db: dict[int, list[bytes]] = {}
    for db, key in keys:
        by_db.setdefault(db, []).append(key)
    if not by_db:
        return
    commands = [
        (b"HSET", own.index(db).encode(), *[a for f in fields for a in (f, UNKNOWN)])
        for db, fields in by_db.items()
    ]
    for reply in await resp.pipeline(r, commands):
        if isinstance(reply, ResponseError):
            raise reply


async def indexed_dbs(r: Redis, own: OwnKeys, candidates: Iterable[int]) -> list[int]:
    """Those of ``candidates`` whose index exists on the stream Redis ``r``, in one round trip."""
    dbs = list(candidates)
    if not dbs:
        return []
    pipe = r.pipeline(transaction=False)
    for db in dbs:
        pipe.exists(own.index(db))
    found = await pipe.execute()
    return [db for db, n in zip(dbs, found, strict=True) if n]


async def exist_on(source: Redis, keys: Sequence[bytes]) -> list[bool]:
    """Whether each key exists on ``source``: one pipelined ``EXISTS`` per key."""
    exists = await resp.pipeline(source, [(b"EXISTS", key) for key in keys])
    for reply in exists:
        if isinstance(reply, ResponseError):
            raise reply
    return [bool(n) for n in exists]


async def absent_page(
    stream: Redis,
    exists: Callable[[Sequence[bytes]], Awaitable[list[bool]]],
    own: OwnKeys,
    db: int,
    cursor: int,
    *,
    pattern: str,
    count: int,
) -> tuple[int, list[bytes]]:
    """One step of a walk over ``db``'s index: the next cursor (0 when done), and the fields
    of this step whose key no longer exists, as ``exists`` tells (:func:`exist_on` a client
    of ``db``, or a cluster's lookup where each key lives).

    ``HSCAN … MATCH pattern`` filters with Redis's own glob matcher, the one that also filters
    the bridge's SCAN and its keyspace subscription, so all three agree on what is watched.
    Two round trips: the ``HSCAN`` on the stream Redis, one pipelined ``EXISTS`` per field on
    the source (per master, in a cluster). A field may come twice (HSCAN's guarantee), and
    rrb's own keys never come.
    """
    cursor, page = await stream.hscan(own.index(db), cursor=cursor, match=pattern, count=count)
    fields = [k for k in cast(dict[bytes, bytes], page) if not own.is_own(k)]
    if not fields:
        return int(cursor), []
    found = await exists(fields)
    return int(cursor), [k for k, n in zip(fields, found, strict=True) if not n]
