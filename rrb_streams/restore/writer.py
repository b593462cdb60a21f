"""Writing restore items into the target: fetch, verify, choose, filter, RESTORE.

For one batch of items, :meth:`Writer.apply`:

1. fetches each item's objects and verifies them (:func:`rrb_streams.format.codec.decode`, or
   :func:`rrb_streams.format.legacy.decode_legacy`). A damaged object is a *failure* of its item,
   named; nothing of it is written;
2. of an item's records, restores the newest read at or before ``--at``; a tombstone there
   means the key was absent (*absent*);
3. skips keys that ``--match``, ``--db`` or rrb's own prefix leave out (*filtered*), and keys
   whose absolute expiry has passed on the target's clock (*expired*). ``RESTORE`` with a past
   ``ABSTTL`` would silently delete an existing key, so they never reach it;
4. refuses payloads from a newer RDB version than the target reads (*failed*, saying so);
5. writes the rest in one pipeline per destination db: ``RESTORE key ttl payload ABSTTL``
   with ``REPLACE`` under ``--if-exists replace``, without it otherwise (a ``BUSYKEY`` reply
   is then *existing*, or a failure under ``fail``). Legacy objects hold plain strings:
   ``SET``, or ``SET … NX``.

Transient errors (storage unavailable, the target unreachable, or a reply such as ``OOM`` or
``READONLY`` that says the target cannot take writes now) raise, and the caller retries the
whole batch: every write in it is idempotent.

**A Redis Cluster target** (``cluster``, see :mod:`rrb_streams.restore.cluster_target`): the
same commands, packed the same way, go to the master of each key's slot, one pipeline per
master, the masters at once; redirections and failovers are followed there and never count
against a key. A cluster has only db 0, so:

- with ``--db N`` (or ``--format legacy``), the keys backed up from db N go into db 0 (the
  target URL must name db 0, or none);
- without ``--db``, the keys backed up from db 0 go into db 0, and a key of any other db is
  *failed*, with a reason that says to restore that db on its own with ``--db N``. Which dbs a
  backup holds is known only as its plan is read, so the restore does not refuse up front;
  and merging dbs silently could let one db's key overwrite another's. In the segment layout
  only the first such key of each db in a key range is named, the rest are counted, so a
  large db does not flood the run's failure list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from rrb_streams.config import RestoreConfig
from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format import codec
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.layout import key_hash
from rrb_streams.format.legacy import decode_legacy, parse_legacy_name
from rrb_streams.format.ranges import Key, Range, prefer_keys_layout, read_range_fresh
from rrb_streams.logs import show_key
from rrb_streams.restore.cluster_target import ClusterTarget, Packed
from rrb_streams.storage.base import Fetched, Storage
from rrb_streams.wire import resp
from rrb_streams.wire.connections import connect
from rrb_streams.wire.keyglob import compile_glob

RESTORED = "restored"
EXPIRED = "expired"
FILTERED = "filtered"
EXISTING = "existing"
ABSENT = "absent"
FAILED = "failed"
OUTCOMES = (RESTORED, EXPIRED, FILTERED, EXISTING, ABSENT, FAILED)

_DECODE_IN_THREAD = 1 << 20  # bytes above which checksumming leaves the event loop


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one item. ``reason`` names the object and says why, for failures."""

    outcome: str
    bytes: int = 0  # payload bytes written
    name: str = ""
    reason: str = ""


@dataclass
class Tally:
    """What became of many keys: a count per outcome, and the failures with their reasons."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    bytes: int = 0  # payload bytes written
    failures: list[Result] = field(default_factory=list)

    def add(self, result: Result) -> None:
        self.counts[result.outcome] += 1
        self.bytes += result.bytes
        if result.outcome == FAILED:
            self.failures.append(result)

    @classmethod
    def of(cls, results: Sequence[Result]) -> Tally:
        tally = cls()
        for r in results:
            tally.add(r)
        return tally


@dataclass(frozen=True, slots=True)
class _Write:
    db: int
    command: tuple[bytes, ...]
    name: str
    key: bytes
    size: int


def rdb_version(payload: bytes) -> int:
    """The RDB version a ``DUMP`` payload was made with: the two bytes before its CRC64."""
    if len(payload) < 10:
        return 0
    return int.from_bytes(payload[-10:-8], "little")


class Writer:
    """Applies batches of items to the target. One per process, shared by its writers.

    ``target_rdb`` is the highest RDB version the target reads, and ``clock_offset_ms`` the
    target's clock minus this host's, so expiry is judged by the clock that enforces it.
    """

    def __init__(
        self,
        cfg: RestoreConfig,
        storage: Storage,
        *,
        target_rdb: int,
        clock_offset_ms: float,
        log: Any,
        cluster: ClusterTarget | None = None,
    ) -> None:
        """``cluster``: the target is that Redis Cluster (started); the writer closes it."""
        self._cfg = cfg
        self._storage = storage
        self._target_rdb = target_rdb
        self._clock_offset_ms = clock_offset_ms
        self._log = log
        self._match: Callable[[bytes], bool] = compile_glob(
            cfg.match.encode("utf-8", "surrogateescape")
        )
        self._own = cfg.own_prefix.encode()
        self._clients: dict[int, Redis] = {}
        self._cluster = cluster
        self._dbs_refused: set[int] = set()  # dbs whose keys a cluster cannot take, logged

    @property
    def target_rdb(self) -> int:
        """The highest RDB version the target reads."""
        return self._target_rdb

    @property
    def cluster(self) -> ClusterTarget | None:
        """The Redis Cluster the target is, if it is one."""
        return self._cluster

    def client(self, db: int) -> Redis:
        """The target client for ``db``, created on first use."""
        r = self._clients.get(db)
        if r is None:
            r = self._clients[db] = connect(
                self._cfg.target_url, db=db, name="rrb-restore", tls=self._cfg.tls
            )
        return r

    async def close(self) -> None:
        for r in self._clients.values():
            await r.aclose()
        self._clients.clear()
        if self._cluster is not None:
            await self._cluster.close()

    async def apply(self, items: Sequence[Sequence[str]]) -> list[Result]:
        """Restore each item (a sequence of candidate object names); one result per item."""
        names = [name for item in items for name in item]
        fetched = dict(zip(names, await self._storage.get_many(names), strict=True))
        results: list[Result | None] = []
        writes: list[tuple[int, _Write]] = []
        for i, item in enumerate(items):
            outcome = await self._prepare(item, fetched)
            if isinstance(outcome, _Write):
                writes.append((i, outcome))
                results.append(None)
            else:
                results.append(outcome)
        for i, result in await self._write(writes):
            results[i] = result
        return [r for r in results if r is not None]

    async def apply_range(self, rng: Range, *, mixed: bool = False) -> tuple[Tally, list[Key]]:
        """Restore the keys of one key range of the segment layout; what became of them, and
        every key the range decided (for ``mixed``).

        ``mixed``: the prefix holds the keys layout too, and each key's latest-state object
        there competes with its newest segment record, by read time on the source clock.

        This is the restore's hot path: tens of thousands of keys per call. Commands are
        packed in one go per db and a reply of OK costs a counter, not an object.
        """
        cfg = self._cfg
        read = await read_range_fresh(self._storage, cfg.path_prefix, rng, at_us=cfg.at_us)
        tally = Tally()
        for d in read.damaged:
            tally.add(self._failed(f"{d.name}@{d.block}", d.reason))
        for db, key in read.undecided:
            reason = (
                f"key '{show_key(key)}' of db {db}: a damaged block may hold its newest "
                "record, so no older one is restored"
            )
            tally.add(self._failed(f"db{db}:{show_key(key)}", reason))
        winners = read.winners
        seen = [*winners, *read.undecided] if mixed else []
        if mixed:
            await prefer_keys_layout(
                self._storage,
                cfg.path_prefix,
                winners,
                at_us=cfg.at_us,
                on_damaged=lambda name, reason: self._log.warning(
                    "restore.object_skipped", object=name, reason=reason
                ),
            )
        counts = tally.counts
        own, match, only_db, into = self._own, self._match, cfg.db, cfg.into_db
        # One Redis version writes one RDB version: check each version once, not each key.
        readable: dict[str, bool] = {}
        everything = cfg.match == "*"
        now_ms = self._now_ms()
        tail = b"$7\r\nREPLACE\r\n" if cfg.if_exists == "replace" else b""
        # Per command: its key, object and value size. Not the record: the range's records go
        # before the commands are sent (below), so a range is held decoded or packed, not both.
        by_db: dict[int, tuple[list[bytes], list[tuple[bytes, str, int]]]] = {}
        large: list[tuple[int, KeyRecord, str]] = []
        cluster = self._cluster
        refused: set[int] = set()  # dbs a cluster cannot take, named once in this range
        for rec, name in winners.values():
            if rec.tombstone:
                counts[ABSENT] += 1
                continue
            key, payload, expire = rec.key, rec.payload, rec.expire_at_ms
            if (
                key.startswith(own)
                or (only_db is not None and rec.db != only_db)
                or (not everything and not match(key))
            ):
                counts[FILTERED] += 1
                continue
            if expire is not None and expire <= now_ms:
                counts[EXPIRED] += 1
                continue
            fits = readable.get(rec.redis_version)
            if fits is None:
                fits = readable[rec.redis_version] = rdb_version(payload) <= self._target_rdb
            if not fits:
                tally.add(self._too_new(rec, name))
                continue
            db = rec.db if into is None else into
            if db and cluster is not None:
                if db in refused:
                    counts[FAILED] += 1
                else:
                    refused.add(db)
                    tally.add(self._not_in_cluster(db, key, name, first=True))
                continue
            if len(payload) >= _LARGE_VALUE:
                large.append((db, rec, name))
                continue
            packed, meta = by_db.setdefault(db, ([], []))
            packed.append(_packed_restore(key, expire, payload, tail))
            meta.append((key, name, len(payload)))
        winners.clear()  # every record left is in ``large``
        sent: list[tuple[int, list[Any], list[tuple[bytes, str, int]]]] = []
        if cluster is not None:
            packed, meta = by_db.get(0, ([], []))
            commands: list[Packed] = [*packed]
            for _, rec, name in large:
                commands.append(_restore_pieces(rec.key, rec.expire_at_ms, rec.payload, tail))
                meta.append((rec.key, name, len(rec.payload)))
            if commands:
                replies = await cluster.send(commands, [key for key, _, _ in meta])
                sent.append((0, replies, meta))
            by_db, large = {}, []
        for db, (packed, meta) in by_db.items():
            body, count = b"".join(packed), len(packed)
            packed.clear()  # while Redis works, the range is held once: packed in ``body``
            replies = await resp.pipeline_packed(self.client(db), body, count)
            del body
            sent.append((db, replies, meta))
        for db, rec, name in large:
            # Sent in pieces, not packed: the command would be a second copy of the value.
            pieces = _restore_pieces(rec.key, rec.expire_at_ms, rec.payload, tail)
            reply = await resp.send_large(self.client(db), pieces)
            sent.append((db, [reply], [(rec.key, name, len(rec.payload))]))
        for db, replies, meta in sent:
            for reply, (key, name, size) in zip(replies, meta, strict=True):
                if isinstance(reply, ResponseError):
                    if _unavailable(reply):
                        raise reply  # the target cannot take writes now: retry the range
                    command = (b"RESTORE", key)
                    tally.add(self._judge(_Write(db, command, name, key, 0), reply))
                else:
                    counts[RESTORED] += 1
                    tally.bytes += size
        return tally, seen

    # -- one item ---------------------------------------------------------------------------

    async def _prepare(
        self, names: Sequence[str], fetched: Mapping[str, Fetched]
    ) -> _Write | Result:
        cfg = self._cfg
        if not names:
            return self._failed("", "a restore entry without an object name")
        if cfg.legacy:
            return self._prepare_legacy(names[0], fetched[names[0]])
        chosen: KeyRecord | None = None
        chosen_name = ""
        for name in names:
            try:
                rec = await self._decode(name, fetched[name])
            except (ObjectNotFound, CorruptObject) as exc:
                return self._failed(name, _reason(exc, name))
            if cfg.at_us is not None and rec.read_at_us > cfg.at_us:
                continue
            if chosen is None or rec.read_at_us > chosen.read_at_us:
                chosen, chosen_name = rec, name
        if chosen is None or chosen.tombstone:
            return Result(ABSENT, name=names[0])
        return self._restore(chosen, chosen_name)

    def _restore(self, rec: KeyRecord, chosen_name: str) -> _Write | Result:
        """The write that restores ``rec`` (a live record), or why it is not written."""
        cfg = self._cfg
        if not self._wanted(rec.key, rec.db):
            return Result(FILTERED, name=chosen_name)
        if rec.expire_at_ms is not None and rec.expire_at_ms <= self._now_ms():
            return Result(EXPIRED, name=chosen_name)
        if rdb_version(rec.payload) > self._target_rdb:
            return self._too_new(rec, chosen_name)
        command: tuple[bytes, ...] = (
            b"RESTORE",
            rec.key,
            b"0" if rec.expire_at_ms is None else b"%d" % rec.expire_at_ms,
            rec.payload,
        )
        if rec.expire_at_ms is not None:
            command += (b"ABSTTL",)
        if cfg.if_exists == "replace":
            command += (b"REPLACE",)
        db = rec.db if cfg.into_db is None else cfg.into_db
        if db and self._cluster is not None:
            return self._not_in_cluster(db, rec.key, chosen_name)
        return _Write(db, command, chosen_name, rec.key, len(rec.payload))

    def _not_in_cluster(self, db: int, key: bytes, name: str, *, first: bool = False) -> Result:
        """A key backed up from ``db`` (not 0), and a Redis Cluster target without ``--db``.
        ``first``: the key stands for every key of its db in a segment range."""
        hint = f"a Redis Cluster has only db 0: restore db {db} on its own with --db {db}"
        if db not in self._dbs_refused:
            self._dbs_refused.add(db)
            self._log.warning("restore.db_not_in_cluster", db=db, hint=hint)
        if first:
            reason = f"keys of db {db}, '{show_key(key)}' the first of them here: {hint}"
            return Result(FAILED, name=f"db{db}:{show_key(key)}", reason=reason)
        return Result(FAILED, name=name, reason=f"key '{show_key(key)}' of db {db}: {hint}")

    def _too_new(self, rec: KeyRecord, name: str) -> Result:
        version = rdb_version(rec.payload)
        reason = (
            f"key '{show_key(rec.key)}' was dumped by Redis {rec.redis_version} "
            f"(RDB {version}); the target reads RDB {self._target_rdb} at most"
        )
        self._log.warning("restore.newer_rdb", object=name, reason=reason)
        return self._failed(name, reason)

    def _prepare_legacy(self, name: str, data: Fetched) -> _Write | Result:
        try:
            if not isinstance(data, bytes):
                raise data
            key, value = decode_legacy(data, name)
            parsed = parse_legacy_name(name, self._cfg.path_prefix)
            # The format has no checksum; the name's hash of the key is the one check there is.
            if parsed is not None and parsed.key_hash != key_hash(key):
                raise CorruptObject(f"{name}: the key inside does not match the object's name")
        except (ObjectNotFound, CorruptObject) as exc:
            return self._failed(name, _reason(exc, name))
        if not self._wanted(key, None):
            return Result(FILTERED, name=name)
        command: tuple[bytes, ...] = (b"SET", key, value)
        if self._cfg.if_exists != "replace":
            command += (b"NX",)
        assert self._cfg.into_db is not None
        return _Write(self._cfg.into_db, command, name, key, len(value))

    async def _decode(self, name: str, data: Fetched) -> KeyRecord:
        if not isinstance(data, bytes):
            raise data
        if len(data) > _DECODE_IN_THREAD:
            return await anyio.to_thread.run_sync(codec.decode, data, name)
        return codec.decode(data, name)

    def _wanted(self, key: bytes, db: int | None) -> bool:
        if key.startswith(self._own):
            return False  # never ours to write: it could clobber the restore's own state
        if self._cfg.db is not None and db is not None and db != self._cfg.db:
            return False
        return self._match(key)

    def _now_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms

    def _failed(self, name: str, reason: str) -> Result:
        self._log.error("restore.object_failed", object=name, reason=reason)
        return Result(FAILED, name=name, reason=reason)

    # -- writing ----------------------------------------------------------------------------

    async def _write(self, writes: list[tuple[int, _Write]]) -> list[tuple[int, Result]]:
        by_db: dict[int, list[tuple[int, _Write]]] = {}
        for i, w in writes:
            by_db.setdefault(w.db, []).append((i, w))
        out: list[tuple[int, Result]] = []
        for db, group in by_db.items():
            if self._cluster is not None:  # db 0 alone: _restore refused the others
                commands = [resp.pack([w.command]) for _, w in group]
                replies = await self._cluster.send(commands, [w.key for _, w in group])
            else:
                replies = await resp.pipeline(self.client(db), [w.command for _, w in group])
            busy = next((r for r in replies if _unavailable(r)), None)
            if busy is not None:
                raise busy  # the target cannot take writes now: the caller retries the batch
            out += [
                (i, self._judge(w, reply)) for (i, w), reply in zip(group, replies, strict=True)
            ]
        return out

    def _judge(self, w: _Write, reply: Any) -> Result:
        if isinstance(reply, ResponseError):
            if str(reply).startswith("BUSYKEY"):
                return self._existing(w)
            reason = f"key '{show_key(w.key)}': the target refused it: {error_text(reply)}"
            if "payload version" in str(reply):
                reason += " (made by a newer Redis than the target?)"
            return self._failed(w.name, reason)
        if reply is None:  # SET … NX on an existing key
            return self._existing(w)
        return Result(RESTORED, bytes=w.size, name=w.name)

    def _existing(self, w: _Write) -> Result:
        if self._cfg.if_exists == "fail":
            return self._failed(
                w.name, f"key '{show_key(w.key)}' exists in the target (--if-exists fail)"
            )
        return Result(EXISTING, name=w.name)


# Replies that say the target cannot take writes at the moment, whatever the key. (LOADING
# raises a connection error on its own.)
_UNAVAILABLE = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)


def _unavailable(reply: Any) -> bool:
    if isinstance(reply, _UNAVAILABLE):
        return True
    return isinstance(reply, ResponseError) and str(reply).startswith("BUSY ")  # a script


def error_text(exc: ResponseError) -> str:
    """The reply as Redis sent it: redis-py strips the code of the errors it knows."""
    code = getattr(exc, "status_code", None)
    return f"{code} {exc}" if code else str(exc)


#: A value at least this large is sent in pieces (see _restore_pieces), not packed.
_LARGE_VALUE = 16 * 1024 * 1024


def _packed_restore(key: bytes, expire: int | None, payload: bytes, tail: bytes) -> bytes:
    """``RESTORE key ttl payload [ABSTTL] [REPLACE]`` in the Redis protocol, in one format."""
    if expire is None:
        return b"*%d\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$1\r\n0\r\n$%d\r\n%s\r\n%s" % (
            5 if tail else 4,
            len(key),
            key,
            len(payload),
            payload,
            tail,
        )
    ttl = b"%d" % expire
    return b"*%d\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$6\r\nABSTTL\r\n%s" % (
        6 if tail else 5,
        len(key),
        key,
        len(ttl),
        ttl,
        len(payload),
        payload,
        tail,
    )


def _restore_pieces(
    key: bytes, expire: int | None, payload: bytes, tail: bytes, piece: int = 1 << 20
) -> list[bytes | memoryview]:
    """:func:`_packed_restore` as pieces that share ``payload``'s memory, ``piece`` bytes of
    it each."""
    if expire is None:
        head = b"*%d\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (
            5 if tail else 4,
            len(key),
            key,
        )
        after = b"\r\n" + tail
    else:
        ttl = b"%d" % expire
        head = b"*%d\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            6 if tail else 5,
            len(key),
            key,
            len(ttl),
            ttl,
        )
        after = b"\r\n$6\r\nABSTTL\r\n" + tail
    view = memoryview(payload)
    body = [view[i : i + piece] for i in range(0, len(view), piece)]
    return [head + b"$%d\r\n" % len(payload), *body, after]


def _reason(exc: Exception, name: str) -> str:
    if isinstance(exc, ObjectNotFound):
        return f"{name}: gone from storage since it was listed"
    text = str(exc)
    return text if text.startswith(name) else f"{name}: {text}"
