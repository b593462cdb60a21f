"""Reading keys' current state from the source Redis, as :class:`codec.KeyRecord` values.

One read of a db is one MULTI/EXEC transaction: for each key ``DUMP``, its expiry and ``TYPE``,
then ``TIME`` once. Everything in it is one consistent snapshot stamped with the source's own
clock, so version names sort by when the source held that state, whatever host read it.

The expiry comes from ``PEXPIRETIME`` where the source has it (Redis 7.0+): the absolute time
Redis stores, exact to the millisecond. Older sources give ``PTTL``, added to ``TIME``; that sum
can be off by a millisecond because the two commands read the clock at different moments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.resp import transaction_packed
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url

_COMMANDS_PER_KEY = 3
_READ_EXACT = b"".join(
    b"*2\r\n$%d\r\n%s\r\n$%%d\r\n%%b\r\n" % (len(c), c) for c in (b"DUMP", b"PEXPIRETIME", b"TYPE")
)
_READ_PTTL = _READ_EXACT.replace(b"$11\r\nPEXPIRETIME", b"$4\r\nPTTL")
_TIME = b"*1\r\n$4\r\nTIME\r\n"


class KeySource(Protocol):
    """What the uploaders read keys from: a :class:`Source` (one Redis), or a
    :class:`rrb_streams.wire.cluster_source.ClusterSource` (a Redis Cluster)."""

    redis_version: str

    async def check(self) -> None: ...

    async def read(
        self,
        db: int,
        keys: Sequence[bytes],
        entry_ids: Sequence[str],
        stamps: Sequence[int] | None = None,
    ) -> list[KeyRecord | KeyReadError]: ...

    def scan_clients(self, db: int) -> list[Redis]:
        """Clients whose ``SCAN``s together cover ``db``: every master of a cluster."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class KeyReadError:
    """The source refused to read one key (a ``ResponseError`` on its DUMP, expiry or TYPE).

    Permanent for this key as far as we can tell: the caller counts attempts.
    """

    key: bytes
    reason: str


class Source:
    """The source Redis: one lazily opened client per db, and its ``redis_version``.

    Connection errors (``redis.exceptions.ConnectionError``, ``TimeoutError``) propagate from
    :meth:`read` unchanged: they are transient and the caller retries.
    """

    def __init__(
        self, url: str, *, exact_expiry: bool | None = None, tls: TlsOptions = NO_TLS
    ) -> None:
        """``exact_expiry`` forces ``PEXPIRETIME`` (True) or ``PTTL`` (False); ``None`` picks
        by the source's version in :meth:`check`. ``tls`` applies to a ``rediss://`` URL."""
        self.url = url
        self._tls = tls
        self._clients: dict[int, Redis] = {}
        self._exact_expiry = exact_expiry
        self.redis_version = ""

    def client(self, db: int) -> Redis:
        """The client for ``db`` (created on first use, kept until :meth:`close`)."""
        r = self._clients.get(db)
        if r is None:
            r = self._clients[db] = connect(self.url, db=db, name="rrb-upload", tls=self._tls)
        return r

    def scan_clients(self, db: int) -> list[Redis]:
        """The one client of ``db``: see :class:`KeySource`."""
        return [self.client(db)]

    async def check(self) -> None:
        """Ping the source and learn its version. Raises ``DependencyError`` when unreachable."""
        r = self.client(0)
        await ping(r, self.url, "source Redis")
        info = await r.info("server")
        # INFO values that look numeric come back as numbers ("7.2" -> 7.2): keep the text.
        self.redis_version = str(info.get("redis_version", ""))
        if self._exact_expiry is None:
            self._exact_expiry = major_version(self.redis_version) >= 7

    async def read(
        self,
        db: int,
        keys: Sequence[bytes],
        entry_ids: Sequence[str],
        stamps: Sequence[int] | None = None,
    ) -> list[KeyRecord | KeyReadError]:
        """Read every key of ``db`` in one transaction; one result per key, in order.

        An absent key gives a tombstone record. ``entry_ids[i]`` is stored in the record of
        ``keys[i]`` (the change-stream entry that caused the read), and so is ``stamps[i]``,
        its ordering stamp, when given.
        """
        if not keys:
            return []
        body = read_body(keys, exact_expiry=bool(self._exact_expiry))
        replies = await transaction_packed(self.client(db), body, read_count(len(keys)))
        return records_from(
            replies, db, keys, entry_ids, stamps, self.redis_version, bool(self._exact_expiry)
        )

    async def close(self) -> None:
        """Close every client. Idempotent."""
        clients, self._clients = list(self._clients.values()), {}
        for r in clients:
            await r.aclose()

    def __repr__(self) -> str:
        return f"Source({redact_url(self.url)!r})"


def read_body(keys: Sequence[bytes], *, exact_expiry: bool) -> bytes:
    """The packed commands that read ``keys`` (``DUMP``, expiry, ``TYPE`` each), then ``TIME``:
    the body of one transaction, :func:`read_count` commands long."""
    # One formatting per key: the commands are the same three for every key.
    template = _READ_EXACT if exact_expiry else _READ_PTTL
    return b"".join([template % ((len(k), k) * _COMMANDS_PER_KEY) for k in keys]) + _TIME


def read_count(keys: int) -> int:
    """The number of commands in :func:`read_body` of ``keys`` keys."""
    return keys * _COMMANDS_PER_KEY + 1


def records_from(
    replies: Sequence[Any],
    db: int,
    keys: Sequence[bytes],
    entry_ids: Sequence[str],
    stamps: Sequence[int] | None,
    redis_version: str,
    exact_expiry: bool,
) -> list[KeyRecord | KeyReadError]:
    """The records of ``keys`` from the EXEC replies of :func:`read_body`; one per key.

    A key the source refused to read (a ``ResponseError`` reply) gives a ``KeyReadError``;
    any other exception among the replies is raised.
    """
    clock = replies[-1]
    if isinstance(clock, Exception):
        raise clock
    sec, usec = clock
    read_at_us = int(sec) * 1_000_000 + int(usec)
    out: list[KeyRecord | KeyReadError] = []
    for i, (key, dump, expiry, type_) in enumerate(
        zip(keys, replies[0:-1:3], replies[1:-1:3], replies[2:-1:3], strict=True)
    ):
        if (
            isinstance(dump, Exception)
            or isinstance(expiry, Exception)
            or isinstance(type_, Exception)
        ):
            failed = next(r for r in (dump, expiry, type_) if isinstance(r, Exception))
            if not isinstance(failed, ResponseError):
                raise failed
            out.append(KeyReadError(key, f"source refused to read the key: {failed}"))
            continue
        stamp = 0 if stamps is None else stamps[i]
        out.append(
            _record(
                db,
                key,
                entry_ids[i],
                read_at_us,
                dump,
                expiry,
                type_,
                stamp,
                redis_version,
                exact_expiry,
            )
        )
    return out


def _record(
    db: int,
    key: bytes,
    entry_id: str,
    read_at_us: int,
    dump: bytes | None,
    expiry: int,
    type_: bytes | str,
    stamp: int,
    redis_version: str,
    exact_expiry: bool,
) -> KeyRecord:
    if dump is None:
        return KeyRecord(
            key, db, "none", None, read_at_us, entry_id, redis_version, b"", True, stamp
        )
    expiry = int(expiry)
    if expiry < 0:
        expire_at_ms = None
    elif exact_expiry:
        expire_at_ms = expiry
    else:
        expire_at_ms = read_at_us // 1000 + expiry
    type_name = type_.decode("ascii") if isinstance(type_, bytes) else str(type_)
    return KeyRecord(
        key=key,
        db=db,
        type=type_name,
        expire_at_ms=expire_at_ms,
        read_at_us=read_at_us,
        entry_id=entry_id,
        redis_version=redis_version,
        payload=bytes(dump),
        stamp=stamp,
    )


def major_version(version: str) -> int:
    """``7`` of ``"7.0.15"``; 0 when unknown."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
