"""``rrb-verify``: prove that storage matches the source, key by key.

Three kinds of difference, each for keys of the watched db(s) that match ``--match`` (rrb's
own keys never count):

- ``missing``: a live key with no object, or whose newest version is a tombstone;
- ``stale``: an object whose type, expiry or value differs from the key's (or that fails its
  checksum);
- ``extra``: an object whose key no longer exists.

**Two passes, bounded memory.**

1. *Storage to source.* The listing is walked in name order through
   :func:`rrb_streams.format.selection.select` (latest-state objects and ``--versioning``
   versions alike: the newest read wins, and a tombstone there means absent). Chunks of keys
   are fetched (``get_many``, a few slices at a time) and read from the source with the
   uploader's own read (:class:`Source`: ``DUMP``, expiry and ``TYPE`` in one transaction), so
   both sides are compared as the pipeline sees them. Each key that storage holds as live
   leaves 8 bytes behind: the first 8 bytes of its SHA-256, in a sorted array per db (8 MB per
   million keys; the listing is already in hash order, so nothing is sorted).
2. *Source to storage.* ``SCAN … MATCH`` walks the source (each master of a cluster); a key
   whose hash prefix is not in the array is a ``missing`` candidate. Two keys sharing a
   64-bit prefix would hide one missing key; at a million keys the odds are below one in ten
   billion.

**Comparison.** Types and absolute expiries (``PEXPIRETIME``, exact on Redis 7; ±1 ms where the
source only has ``PTTL``) must be equal. Values are compared as ``DUMP`` bodies without their
10-byte footer (RDB version and CRC64), so a source upgraded to a newer RDB version still
matches. ``DUMP`` is the serialised encoding, not the logical value: a key that Redis
re-encoded without a write (a restart reloading a hash more compactly) differs until the
bridge's rescan after that restart has re-uploaded it.

**Changes during the check.** A difference is only a candidate at first. After
``recheck_delay`` seconds it is checked once more, from a fresh read of the key and a fresh
listing of its objects. It counts only when it is still there *and* neither side moved in
between: a key that changed, or whose object the pipeline rewrote, is being handled by the
pipeline and is reported as ``changing``, not as drift. At most ``max_pending`` candidates wait
at a time; a full queue waits for its oldest to come due.

**Repair.** ``--repair`` never writes storage. Each confirmed difference becomes a change-stream
entry (event ``verify``) on the stream Redis, and its field of the stored-keys index
(:mod:`rrb_streams.wire.index`) is set to unknown first, so the uploader that takes the entry writes
the key's current state instead of trusting the index.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
from redis.asyncio import Redis

from rrb_streams.config import VerifyConfig
from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format import codec
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.layout import key_dir, key_hash, parse_name
from rrb_streams.format.ranges import (
    FooterStats,
    SegmentIndex,
    plan_ranges,
    prefer_keys_layout,
    read_footers,
    read_range_fresh,
)
from rrb_streams.format.selection import Item, PlanStats, has_keys_layout, select
from rrb_streams.logs import get_logger, show_key
from rrb_streams.ops.progress import Progress, Throttled
from rrb_streams.storage.base import Fetched, Storage
from rrb_streams.verify.report import EXAMPLES, Summary
from rrb_streams.wire import index
from rrb_streams.wire.cluster_source import open_source
from rrb_streams.wire.connections import ping
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.keyglob import compile_glob
from rrb_streams.wire.slot_client import connect_own
from rrb_streams.wire.source import KeyReadError
from rrb_streams.wire.urls import url_db

REPAIR_EVENT = "verify"
_FOOTER = 10  # DUMP ends with a 2-byte RDB version and an 8-byte CRC64
_SLICES = 4  # concurrent get_many calls per chunk
MAX_CORRUPT_TRACKED = 10_000  # damaged objects whose keys pass 2 can still name for repair

#: Builds the progress display of one pass; the argument is its unit ("objects", "keys").
ProgressFactory = Callable[[str], Progress]


def _prefix8(key: bytes) -> int:
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


@dataclass(frozen=True, slots=True)
class _Stored:
    """What storage holds for a key: its newest record, ``None`` when absent, or damage."""

    rec: KeyRecord | None
    name: str | None = None
    corrupt: str | None = None

    def marker(self) -> tuple[Any, ...]:
        """Equal markers: storage did not move for this key between two looks."""
        if self.corrupt is not None:
            return ("corrupt", self.name)
        if self.rec is None:
            return ("absent",)
        return (self.name, self.rec.read_at_us)


@dataclass(slots=True)
class _Candidate:
    kind: str
    db: int
    key: bytes
    live: KeyRecord
    stored: _Stored
    due: float


def _live_marker(rec: KeyRecord) -> tuple[Any, ...]:
    return (rec.tombstone, rec.type, rec.expire_at_ms, rec.payload)


def _same_payload(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    return len(a) > _FOOTER and len(b) > _FOOTER and a[:-_FOOTER] == b[:-_FOOTER]


class Verifier:
    """One verification run over ``storage`` (owned by the caller) against the source."""

    def __init__(
        self,
        cfg: VerifyConfig,
        storage: Storage,
        *,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.summary = Summary()
        self._progress = progress
        self._log = get_logger("verify")
        self._source = open_source(cfg.source_url, cluster=cfg.source_cluster, tls=cfg.tls)
        self._stream: Redis | None = None
        self._matches = compile_glob(cfg.match.encode())
        self._own = cfg.own
        self._url_db = url_db(cfg.source_url)
        self._known: dict[int, array[int]] = {}
        self._unsorted: set[int] = set()
        self._corrupt: set[tuple[int, str]] = set()  # (db, key hash) of damaged objects
        self._pending: deque[_Candidate] = deque()
        self._repairs: list[tuple[int, bytes]] = []
        self._tolerance_ms = 0
        self._segments = SegmentIndex(storage, cfg.path_prefix)
        self._in_segments: dict[int, array[int]] = {}  # with both layouts: keys segments hold
        self._mixed = False

    async def run(self) -> Summary:
        """Check everything, re-check every candidate, queue repairs; return the summary.

        Raises ``DependencyError`` when the source (or, with ``--repair``, the stream Redis)
        cannot be reached; storage errors propagate.
        """
        await self._source.check()
        # Without PEXPIRETIME the uploader adds PTTL to TIME, which can be off by 1 ms.
        major = self._source.redis_version.split(".")[0]
        self._tolerance_ms = 0 if major.isdigit() and int(major) >= 7 else 1
        if self.cfg.repair:
            self._stream = connect_own(
                self.cfg.effective_stream_url, self._own, name="rrb-verify", tls=self.cfg.tls
            )
            await ping(self._stream, self.cfg.effective_stream_url, "stream Redis")
        self._log.info(
            "verify.started",
            storage=self.storage.description,
            prefix=self.cfg.path_prefix,
            match=self.cfg.match,
            all_dbs=self.cfg.all_dbs,
            repair=self.cfg.repair,
        )
        started = time.monotonic()
        try:
            await self._storage_pass()
            for arr_db in self._unsorted:
                self._known[arr_db] = array("Q", sorted(self._known[arr_db]))
            await self._source_pass()
            while self._pending:
                await self._recheck(wait=True)
            await self._flush_repairs()
        finally:
            with anyio.CancelScope(shield=True):
                await self._source.close()
                if self._stream is not None:
                    await self._stream.aclose()
        s = self.summary
        self._log.info(
            "verify.finished",
            checked=s.checked,
            missing=s.missing,
            stale=s.stale,
            extra=s.extra,
            changing=s.changing,
            unreadable=s.unreadable,
            queued=s.queued,
            seconds=round(time.monotonic() - started, 3),
        )
        return s

    # -- pass 1: storage to source -------------------------------------------------------

    def _watched(self, db: int) -> bool:
        return self.cfg.all_dbs or db == self._url_db

    async def _segments_pass(self) -> None:
        """The segment layout, one key range at a time: each key's newest record (or its
        keys-layout object, where that was read later) compared with the source."""
        prefix = self.cfg.path_prefix
        footers = FooterStats()
        blocks = await read_footers(self.storage, prefix, stats=footers)
        for name, reason in footers.damaged:
            self._count("stale", name)
            self._log.warning("verify.corrupt_object", object=name, reason=reason)
        if not blocks:
            return
        self._mixed = await has_keys_layout(self.storage, prefix)
        bar = Throttled(self._progress("records")) if self._progress else None
        ranges = plan_ranges(blocks)
        total = sum(r.records for r in ranges)
        done = 0
        try:
            for rng in ranges:
                read = await read_range_fresh(self.storage, prefix, rng)
                # A damaged block is not a difference of its own: each key it leaves undecided
                # counts (stale), and a key only it held shows as missing in the source pass.
                for d in read.damaged:
                    self._log.warning("verify.corrupt_object", object=d.name, reason=d.reason)
                for db, key in read.undecided:
                    self._corrupt_seen(db, key_hash(key), _Stored(None, None, "damaged block"))
                if self._mixed:
                    await prefer_keys_layout(self.storage, prefix, read.winners)
                found: list[tuple[int, str, _Stored]] = []
                for (db, key), (rec, name) in read.winners.items():
                    if self._watched(db):
                        found.append((db, key_hash(key), _Stored(rec, name)))
                    if self._mixed:
                        self._in_segments.setdefault(db, array("Q")).append(_prefix8(key))
                await self._compare(found)
                done += rng.records
                if bar is not None:
                    bar.update(done, total, listing_done=True)
            if bar is not None:
                bar.update(total, total, listing_done=True, final=True)
        finally:
            if bar is not None:
                bar.close()
        for arr in self._in_segments.values():
            arr[:] = array("Q", sorted(arr))

    async def _storage_pass(self) -> None:
        await self._segments_pass()
        stats = PlanStats()
        bar = Throttled(self._progress("objects")) if self._progress else None
        chunk: list[tuple[int, Item]] = []
        done = 0
        try:
            listing = self.storage.list(self.cfg.path_prefix)
            async for item in select(listing, self.cfg.path_prefix, at_us=None, stats=stats):
                parsed = parse_name(item.names[0], self.cfg.path_prefix)
                if parsed is None or not self._watched(parsed.db):
                    continue
                if parsed.db in self._in_segments and _has(
                    self._in_segments[parsed.db], int(parsed.key_hash[:16], 16)
                ):
                    continue  # the segments pass compared this key, with this object too
                chunk.append((parsed.db, item))
                if len(chunk) >= self.cfg.chunk_size:
                    await self._check_chunk(chunk)
                    done += len(chunk)
                    chunk = []
                    if bar is not None:
                        bar.update(done, stats.keys, listing_done=False)
            await self._check_chunk(chunk)
            done += len(chunk)
            if bar is not None:
                bar.update(done, done, listing_done=True, final=True)
        finally:
            if bar is not None:
                bar.close()

    async def _fetch(self, items: Sequence[tuple[int, Item]]) -> list[_Stored]:
        """The newest record of each item, fetched in a few concurrent slices."""
        out: list[_Stored | None] = [None] * len(items)
        step = max(1, -(-len(items) // _SLICES))

        async def fetch(lo: int) -> None:
            part = items[lo : lo + step]
            names = [n for _, item in part for n in item.names]
            blobs = await self.storage.get_many(names)
            pos = 0
            for i, (_, item) in enumerate(part, start=lo):
                got = blobs[pos : pos + len(item.names)]
                pos += len(item.names)
                out[i] = _newest(item.names, got)

        async with anyio.create_task_group() as tg:
            for lo in range(0, len(items), step):
                tg.start_soon(fetch, lo)
        return [s for s in out if s is not None]

    async def _check_chunk(self, chunk: Sequence[tuple[int, Item]]) -> None:
        if not chunk:
            return
        stored = await self._fetch(chunk)
        await self._compare(
            [
                (db, item.group.rsplit("/", 1)[-1], st)
                for (db, item), st in zip(chunk, stored, strict=True)
            ]
        )

    async def _compare(self, found: Sequence[tuple[int, str, _Stored]]) -> None:
        """Compare what storage holds (per db and key hash) with the source's keys."""
        by_db: dict[int, list[tuple[bytes, _Stored]]] = {}
        for db, hex_hash, st in found:
            if st.rec is not None and st.rec.tombstone:
                st = _Stored(None, st.name)
            if st.rec is None and st.corrupt is None:
                continue  # a tombstone is newest: absent in storage; pass 2 checks the key
            if st.corrupt is not None:
                # Damage hides the key; its hash is in the name. Remember it, so pass 2 does
                # not call the key missing as well, and can queue its repair.
                self._corrupt_seen(db, hex_hash, st)
                continue
            rec = st.rec
            assert rec is not None
            if self._own.is_own(rec.key) or not self._matches(rec.key):
                continue
            self._remember(db, _prefix8(rec.key))
            by_db.setdefault(db, []).append((rec.key, st))
        for db, pairs in by_db.items():
            keys = [k for k, _ in pairs]
            live = await self._source.read(db, keys, [""] * len(keys))
            for (key, st), now in zip(pairs, live, strict=True):
                self.summary.checked += 1
                self._consider(db, key, st, now)
        await self._recheck(wait=False)

    def _corrupt_seen(self, db: int, hex_hash: str, st: _Stored) -> None:
        self.summary.checked += 1
        self._count("stale", st.name or hex_hash)
        self._log.warning("verify.corrupt_object", object=st.name, reason=st.corrupt)
        self._remember(db, int(hex_hash[:16], 16))
        if len(self._corrupt) < MAX_CORRUPT_TRACKED:
            self._corrupt.add((db, hex_hash))

    def _remember(self, db: int, value: int) -> None:
        arr = self._known.setdefault(db, array("Q"))
        if arr and value < arr[-1]:
            self._unsorted.add(db)
        arr.append(value)

    # -- pass 2: source to storage -------------------------------------------------------

    async def _dbs(self) -> list[int]:
        if not self.cfg.all_dbs or self.cfg.source_cluster:
            return [self._url_db]
        (client,) = self._source.scan_clients(self._url_db)
        info: dict[str, Any] = await client.info("keyspace")
        return sorted(int(name[2:]) for name in info if name.startswith("db"))

    async def _source_pass(self) -> None:
        dbs = await self._dbs()
        total = 0
        for db in dbs:
            for client in self._source.scan_clients(db):
                total += int(await client.dbsize())
        bar = Throttled(self._progress("keys")) if self._progress else None
        done = 0
        try:
            scans = [(db, client) for db in dbs for client in self._source.scan_clients(db)]
            for db, client in scans:  # every master's keys, in a cluster
                known = self._known.get(db, array("Q"))
                cursor = 0
                while True:
                    cursor, page = await client.scan(
                        cursor, match=self.cfg.match.encode(), count=self.cfg.scan_count
                    )
                    keys = cast(list[bytes], page)  # the client never decodes
                    done += len(keys)
                    if self._corrupt and self.cfg.repair:
                        self._repair_corrupt(db, keys)
                    absent = [
                        k for k in keys if not self._own.is_own(k) and not _contains(known, k)
                    ]
                    if absent:
                        live = await self._source.read(db, absent, [""] * len(absent))
                        for key, now in zip(absent, live, strict=True):
                            if isinstance(now, KeyReadError) or not now.tombstone:
                                self.summary.checked += 1
                            self._consider(db, key, _Stored(None), now)
                        await self._recheck(wait=False)
                    if bar is not None:
                        bar.update(done, max(total, done), listing_done=True, final=not cursor)
                    if not cursor:
                        break
        finally:
            if bar is not None:
                bar.close()

    def _repair_corrupt(self, db: int, keys: Sequence[bytes]) -> None:
        for key in keys:
            if (db, h := key_hash(key)) in self._corrupt:
                self._corrupt.discard((db, h))
                self._repairs.append((db, key))

    # -- comparing, re-checking, counting ------------------------------------------------

    def _classify(self, stored: _Stored, live: KeyRecord) -> str | None:
        if stored.corrupt is not None:
            return "stale"
        rec = stored.rec
        if rec is not None and rec.expire_at_ms is not None and rec.expire_at_ms <= _now_ms():
            rec = None  # expired in storage: a restore skips it, so it stands for absent
        if rec is None:
            return None if live.tombstone else "missing"
        if live.tombstone:
            return "extra"
        if rec.type != live.type or not _same_payload(rec.payload, live.payload):
            return "stale"
        if (rec.expire_at_ms is None) != (live.expire_at_ms is None):
            return "stale"
        if rec.expire_at_ms is not None and live.expire_at_ms is not None:
            if abs(rec.expire_at_ms - live.expire_at_ms) > self._tolerance_ms:
                return "stale"
        return None

    def _consider(
        self, db: int, key: bytes, stored: _Stored, live: KeyRecord | KeyReadError
    ) -> None:
        if isinstance(live, KeyReadError):
            self.summary.unreadable += 1
            self._log.warning("verify.unreadable", db=db, key=show_key(key), reason=live.reason)
            return
        kind = self._classify(stored, live)
        if kind is None:
            return
        due = anyio.current_time() + self.cfg.recheck_delay
        self._pending.append(_Candidate(kind, db, key, live, stored, due))

    async def _recheck(self, *, wait: bool) -> None:
        """Re-check the candidates that are due. ``wait``: also wait for the oldest one.

        Waits as well whenever more than ``max_pending`` candidates are queued.
        """
        if not self._pending:
            return
        if wait or len(self._pending) >= self.cfg.max_pending:
            await anyio.sleep(max(0.0, self._pending[0].due - anyio.current_time()))
        now = anyio.current_time()
        due: list[_Candidate] = []
        while self._pending and self._pending[0].due <= now:
            due.append(self._pending.popleft())
        by_db: dict[int, list[_Candidate]] = {}
        for c in due:
            by_db.setdefault(c.db, []).append(c)
        if by_db:
            await self._segments.refresh()
        for db, group in by_db.items():
            stored = await self._stored_each(db, [c.key for c in group])
            live = await self._source.read(db, [c.key for c in group], [""] * len(group))
            for c, st, now_rec in zip(group, stored, live, strict=True):
                self._settle(c, st, now_rec)
        await self._flush_repairs(only_full=True)

    def _settle(self, c: _Candidate, stored: _Stored, live: KeyRecord | KeyReadError) -> None:
        if isinstance(live, KeyReadError):
            self.summary.unreadable += 1
            return
        kind = self._classify(stored, live)
        if kind is None:
            return
        if _live_marker(live) != _live_marker(c.live) or stored.marker() != c.stored.marker():
            self.summary.changing += 1
            self._log.debug("verify.changing", db=c.db, key=show_key(c.key), kind=kind)
            return
        self._log.info(
            "verify.difference", kind=kind, db=c.db, key=show_key(c.key), object=stored.name
        )
        self._count(kind, show_key(c.key, c.db))
        if self.cfg.repair:
            self._repairs.append((c.db, c.key))

    def _count(self, kind: str, name: str) -> None:
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        shown = self.summary.examples[kind]
        if len(shown) < EXAMPLES:
            shown.append(name)

    async def _stored_each(self, db: int, keys: Sequence[bytes]) -> list[_Stored]:
        """:meth:`_stored_now` of every key, up to ``_SLICES`` at a time, in order."""
        out: list[_Stored] = [_Stored(None)] * len(keys)
        limit = anyio.CapacityLimiter(_SLICES)

        async def one(i: int) -> None:
            async with limit:
                out[i] = await self._stored_now(db, keys[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(keys)):
                tg.start_soon(one, i)
        return out

    async def _stored_now(self, db: int, key: bytes) -> _Stored:
        """A fresh look at one key: its keys-layout objects (their own small listing) and its
        records in the segments (as of this round's refresh); the newest wins."""
        kept = _Stored(None)
        folder = key_dir(self.cfg.path_prefix, db, key)
        listing = self.storage.list(folder)
        async for item in select(listing, self.cfg.path_prefix, at_us=None, stats=PlanStats()):
            if item.group == folder:
                kept = _newest(item.names, await self.storage.get_many(item.names))
                break
        # A key a damaged block leaves undecided has no winner: it looks absent here, as it
        # did to the pass that made it a candidate (the storage pass counts undecided keys).
        found = (await self._segments.lookup([(db, key)])).winners.get((db, key))
        if found is None:
            return kept
        rec, name = found
        newer_keys = kept.rec is not None and kept.rec.read_at_us > rec.read_at_us
        if kept.corrupt is not None or newer_keys:
            return kept
        return _Stored(None, name) if rec.tombstone else _Stored(rec, name)

    async def _flush_repairs(self, *, only_full: bool = False) -> None:
        if not self._repairs or (only_full and len(self._repairs) < self.cfg.chunk_size):
            return
        assert self._stream is not None
        repairs, self._repairs = self._repairs, []
        now_ms = int(time.time() * 1000)
        # The index may claim the state storage lacks (an object lost or damaged behind the
        # pipeline's back); unknown makes the uploader write instead of skipping.
        await index.mark_unknown(self._stream, self._own, repairs)
        pipe = self._stream.pipeline(transaction=False)
        for db, key in repairs:
            pipe.xadd(self._own.stream, entry_fields(db, key, REPAIR_EVENT, now_ms))  # type: ignore[arg-type]
        await pipe.execute()
        self.summary.queued += len(repairs)
        self._log.info("verify.repairs_queued", entries=len(repairs), stream=self._own.stream)


def _contains(known: array[int], key: bytes) -> bool:
    return _has(known, _prefix8(key))


def _has(known: array[int], value: int) -> bool:
    i = bisect.bisect_left(known, value)
    return i < len(known) and known[i] == value


def _now_ms() -> float:
    return time.time() * 1000


def _newest(names: Sequence[str], blobs: Sequence[Fetched]) -> _Stored:
    """The newest of one key's candidate objects, as :mod:`rrb_streams.restore.writer` picks it."""
    chosen: KeyRecord | None = None
    chosen_name: str | None = None
    for name, blob in zip(names, blobs, strict=True):
        if isinstance(blob, ObjectNotFound):
            continue  # deleted since the listing: the other candidate, or absent
        if isinstance(blob, CorruptObject):
            return _Stored(None, name, corrupt=str(blob))
        try:
            rec = codec.decode(blob, name)
        except CorruptObject as exc:
            return _Stored(None, name, corrupt=str(exc))
        if chosen is None or rec.read_at_us > chosen.read_at_us:
            chosen, chosen_name = rec, name
    if chosen is None or chosen.tombstone:
        return _Stored(None, chosen_name)
    return _Stored(chosen, chosen_name)
