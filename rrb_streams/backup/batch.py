"""One batch of change entries, from the leases to the acknowledgement.

1. Entries for rrb's own keys, and pending entries since deleted from the stream, are
   acknowledged as they are; entries that cannot be parsed go to the dead letters.
2. The rest are merged per ``(db, key)``: one read and at most one write per key per round,
   however many entries name it.
3. Rounds run until every key is settled. Each round:

   a. takes the leases of the keys that are ready and reads their done markers and their
      fields of the stored-keys index (one script call per :data:`~rrb_streams.backup.lease.CHUNK`
      keys, see :mod:`rrb_streams.backup.lease`);
   b. settles without a read every key whose done marker covers its newest entry;
   c. reads the other keys from the source, one transaction per db, and settles without a
      write every key whose state has the digest the index holds: storage has it already;
   d. marks the keys about to be written as unknown in the index (one ``HSET`` per db), then
      with the segments layout hands their records, stamped with their leases' ordering
      stamps, to the process's :class:`~rrb_streams.backup.segments.SegmentSink` and waits
      until their segment is durable; with the keys layout writes their objects with up to
      ``concurrency`` writers taking turns at the round's list, each storage call bounded by
      the process-wide limiter, then calls ``storage.flush()``;
   e. releases the leases, advancing the done markers and storing the new digests (or
      removing the fields of absent keys), again one script call per chunk of keys; a key
      whose lease was lost meanwhile is redone in a later round, and a redo always writes.
      So is a key whose round failed after its write began (the release lost with its
      connection): its write may have landed after another holder's;
   f. acknowledges the entries of the settled keys.

   A key whose lease another uploader holds waits a short jittered while and joins a later
   round, so one contended key never holds back the rest of the batch.

A transient failure (storage unavailable, a Redis connection lost) retries the round after a
capped backoff and acknowledges nothing it did not finish. A failure of one key that retrying
cannot fix (storage rejected the object, the source refused to read the key) counts attempts;
after ``max_attempts`` the key's entries go to the dead letters.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.backup import deadletter
from rrb_streams.backup.deadletter import DeadLetter
from rrb_streams.backup.lease import Leases, Release
from rrb_streams.backup.metrics import UploadMetrics, UploadStats
from rrb_streams.backup.segments import SegmentSink
from rrb_streams.config import UploadConfig
from rrb_streams.errors import ObjectRejected, StorageError, StorageUnavailable
from rrb_streams.format.codec import KeyRecord, encode
from rrb_streams.format.layout import key_hash, latest_name, version_name
from rrb_streams.logs import show_key
from rrb_streams.ops.metrics import Metrics
from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.storage.base import Storage
from rrb_streams.wire import index
from rrb_streams.wire.entries import id_tuple, parse_entry
from rrb_streams.wire.group import GroupReader, RawEntry
from rrb_streams.wire.index import Stored
from rrb_streams.wire.source import KeyReadError, KeySource

#: A storage call that outlasts this many leases is treated as hung and given up on.
CALL_TIMEOUT_LEASES = 4

_LEASE_POLL_MIN = 0.01  # seconds; doubles per failed attempt to take a lease
_LEASE_POLL_MAX = 0.25
_YIELD_AFTER_FAILURE = 2 * _LEASE_POLL_MAX  # seconds: see _round
_ENCODE_IN_THREAD = 1 << 20  # bytes of payload above which checksumming leaves the event loop


@dataclass(slots=True)
class Batch:
    """Entries read together. ``redo``: they may have been half done by a consumer that died
    (claimed, or our own from before a restart), so done markers must not excuse a write."""

    entries: list[RawEntry]
    redo: bool = False


@dataclass(eq=False, slots=True)
class _Key:
    db: int
    key: bytes
    hash: str
    force: bool  # ignore the done marker and the index: see Batch.redo and lease.py
    entries: list[RawEntry] = field(default_factory=list)
    max_id: str = "0-0"
    attempts: int = 0
    lease_waits: int = 0
    not_before: float = 0.0
    stored: bytes | None = None  # the index value read with the lease
    stamp: int = 0  # the ordering stamp drawn with the lease (see lease.py)


@dataclass(eq=False, slots=True)
class _Outcome:
    """What became of the keys of one round that were read: each is in exactly one field."""

    failures: dict[_Key, str] = field(default_factory=dict)  # failed for good, with reasons
    written: dict[_Key, bytes | None] = field(default_factory=dict)  # digest; None: absent
    read_at_us: list[int] = field(default_factory=list)  # of the written keys, for the lag
    unchanged: list[_Key] = field(default_factory=list)  # storage held the state already


@dataclass(eq=False, slots=True)
class _Work:
    token: str = field(default_factory=Leases.new_token)  # one per batch: rounds never overlap
    keys: dict[tuple[int, bytes], _Key] = field(default_factory=dict)
    acks: list[str] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    tally: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("puts", "deletes", "unchanged", "skipped", "redone", "dead"), 0
        )
    )


class BatchProcessor:
    """Runs batches for one uploader. Safe to call :meth:`process` from many tasks at once."""

    def __init__(
        self,
        cfg: UploadConfig,
        storage: Storage,
        stream_r: Redis,
        source: KeySource,
        leases: Leases,
        limiter: anyio.CapacityLimiter,
        stats: UploadStats,
        reader: GroupReader,
        log: Any,
        metrics: Metrics | None = None,
        sink: SegmentSink | None = None,
    ) -> None:
        """``sink`` receives the records of the segments layout; ``None``: the keys layout."""
        self._cfg = cfg
        self._metrics = metrics
        self._storage = storage
        self._r = stream_r
        self._source = source
        self._leases = leases
        self._limiter = limiter
        self._stats = stats
        self._reader = reader  # whose entries in hand this processor settles
        self._lags = None if metrics is None else metrics.part(UploadMetrics)
        self._log = log
        self._retrying = Retrying(log, "upload", "batch", cap=cfg.max_backoff, metrics=metrics)
        self._call_timeout = cfg.lease * CALL_TIMEOUT_LEASES
        self._target = index.storage_target(
            storage.description, cfg.path_prefix, versioning=cfg.versioning, layout=cfg.layout
        )
        self._sink = sink

    @property
    def sink(self) -> SegmentSink | None:
        """The segment sink the batches write to; ``None`` with the keys layout."""
        return self._sink

    async def process(self, batch: Batch) -> None:
        """Settle every entry of ``batch``: written and acknowledged, or dead-lettered.

        Returns only when all are acknowledged; retries transient failures for as long as it
        takes. Cancellation leaves the unfinished entries pending for a later claim.
        """
        started = anyio.current_time()
        work = self._prepare(batch)
        keys = len(work.keys)
        try:
            while True:
                try:
                    await self._commit(work)
                    if work.keys:
                        await self._wait_ready(work)
                        await self._round(work)
                        await self._commit(work)
                except TRANSIENT as exc:
                    await self._retrying.failed(work, exc)
                    continue
                self._retrying.succeeded(work)
                if not work.keys:
                    break
        finally:
            self._retrying.forget(work)
        t = work.tally
        self._log.info(
            "upload.batch_written",
            entries=len(batch.entries),
            keys=keys,
            puts=t["puts"],
            deletes=t["deletes"],
            unchanged=t["unchanged"],
            skipped=t["skipped"],
            redone=t["redone"],
            dead_lettered=t["dead"],
            seconds=round(anyio.current_time() - started, 4),
        )

    def _prepare(self, batch: Batch) -> _Work:
        work = _Work()
        for entry_id, fields in batch.entries:
            if not fields:  # deleted from the stream while pending: nothing left to back up
                work.acks.append(entry_id)
                work.tally["skipped"] += 1
                continue
            try:
                change = parse_entry(entry_id, fields)
                if change.db < 0:
                    raise ValueError(f"malformed change entry {entry_id!r}: db {change.db}")
            except ValueError as exc:
                work.dead.append(DeadLetter(entry_id, fields, str(exc), 1))
                continue
            if self._cfg.own.is_own(change.key):
                work.acks.append(entry_id)
                work.tally["skipped"] += 1
                continue
            k = work.keys.get((change.db, change.key))
            if k is None:
                k = _Key(change.db, change.key, key_hash(change.key), force=batch.redo)
                k.max_id = entry_id
                work.keys[(change.db, change.key)] = k
            elif id_tuple(entry_id) > id_tuple(k.max_id):
                k.max_id = entry_id
            k.entries.append((entry_id, fields))
        return work

    async def _wait_ready(self, work: _Work) -> None:
        soonest = min(k.not_before for k in work.keys.values())
        delay = soonest - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)

    async def _round(self, work: _Work) -> None:
        now = anyio.current_time()
        ready = [k for k in work.keys.values() if k.not_before <= now]
        token = work.token
        grants, tail = await self._leases.acquire(
            [(k.db, k.hash) for k in ready], token, index_fields=[k.key for k in ready]
        )
        held: list[_Key] = []
        covered: list[_Key] = []
        to_write: list[_Key] = []
        for k, grant in zip(ready, grants, strict=True):
            if not grant.held:
                k.lease_waits += 1
                poll = min(_LEASE_POLL_MAX, _LEASE_POLL_MIN * 2 ** min(k.lease_waits, 8))
                k.not_before = now + poll * random.uniform(0.5, 1.5)
                continue
            k.lease_waits = 0
            k.stored = grant.stored
            k.stamp = grant.stamp
            held.append(k)
            (covered if not k.force and grant.covers(k.max_id) else to_write).append(k)
        try:
            out = await self._write_round(work, token, held, to_write)
        except BaseException:
            await self._let_go(token, held)
            # Give the keys up for longer than any peer polls for them: an uploader whose
            # storage hangs would otherwise take them back at once, round after round, and a
            # healthy peer waiting on them would rarely find them free.
            for k in held:
                k.not_before = anyio.current_time() + _YIELD_AFTER_FAILURE
            raise
        releases = [Release(k.db, k.hash) for k in covered]
        tail_id = None if tail is None else id_tuple(tail)
        for k in to_write:
            if k in out.failures:
                releases.append(Release(k.db, k.hash))
                continue
            # The newer of the key's newest entry and the stream's tail at the acquire.
            done = k.max_id if tail_id is None or id_tuple(k.max_id) >= tail_id else tail
            if k in out.written:
                releases.append(Release(k.db, k.hash, done, Stored(k.key, out.written[k])))
            else:
                releases.append(Release(k.db, k.hash, done))
        still_ours = await self._leases.release(token, releases)
        for k in covered:
            self._settle(work, k, written=False)
        for k, ours in zip(to_write, still_ours[len(covered) :], strict=True):
            reason = out.failures.get(k)
            if reason is not None:
                self._failed(work, k, reason, now)
            elif ours:
                self._settle(work, k, written=k in out.written, read=True)
            else:
                # Someone else held the lease while our write was in flight, so ours may have
                # landed after theirs: read and write again, whatever the done marker and the
                # index say.
                k.force = True
                work.tally["redone"] += 1
                self._stats.redone += 1
                self._log.info("upload.lease_lost", db=k.db, key=show_key(k.key))

    async def _write_round(
        self, work: _Work, token: str, held: list[_Key], to_write: list[_Key]
    ) -> _Outcome:
        """Read and write ``to_write`` and flush, renewing ``held`` leases meanwhile."""
        in_flight: set[_Key] = set()
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_leases, token, held, in_flight)
            try:
                out = await self._read_and_write(work, to_write, in_flight)
                if out.written:
                    if self._sink is None:  # a segment is durable once written
                        await self._flush()
                    if self._lags is not None:
                        self._lags.stored(out.read_at_us)
            except Exception as exc:
                failure = exc  # raised below, not wrapped in the task group's ExceptionGroup
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return out

    async def _keep_leases(self, token: str, held: list[_Key], in_flight: set[_Key]) -> None:
        """Renew the round's leases every third of a lease, except those of keys whose storage
        call is in flight: a hung call must lose its lease (see :mod:`rrb_streams.backup.lease`).
        Without this, a round longer than a lease would lose all its leases and redo every
        key, round after round."""
        interval = self._leases.lease_s / 3
        while True:
            await anyio.sleep(interval)
            keep = [(k.db, k.hash) for k in held if k not in in_flight]
            try:
                await self._leases.renew(token, keep)
            except TRANSIENT as exc:
                # A lease that lapses costs a redo of its key, never a change: keep going.
                self._log.warning("upload.lease_renew_failed", keys=len(keep), error=str(exc))

    async def _read_and_write(
        self, work: _Work, to_write: list[_Key], in_flight: set[_Key]
    ) -> _Outcome:
        """Read ``to_write``, then write those whose state storage lacks; ``in_flight`` holds
        the keys whose storage call has not returned.

        Raises the first transient storage error after every write of the round has ended.
        """
        out = _Outcome()
        records: list[tuple[_Key, KeyRecord]] = []
        by_db: dict[int, list[_Key]] = {}
        for k in to_write:
            by_db.setdefault(k.db, []).append(k)
        for db, keys in by_db.items():
            try:
                results = await self._source.read(
                    db, [k.key for k in keys], [k.max_id for k in keys], [k.stamp for k in keys]
                )
            except ResponseError:
                # The source refused the whole transaction (an ACL denying one key aborts it):
                # read the keys one by one, so only the key at fault fails, not its batch.
                results = await self._read_one_by_one(db, keys)
            for k, res in zip(keys, results, strict=True):
                if isinstance(res, KeyReadError):
                    out.failures[k] = res.reason
                    if self._metrics is not None:
                        self._metrics.error("upload", "KeyReadError")
                else:
                    records.append((k, res))
        writes: list[tuple[_Key, KeyRecord, bytes | None]] = []
        for k, rec in records:
            if rec.tombstone:
                digest = None
            elif len(rec.payload) > _ENCODE_IN_THREAD:
                digest = await anyio.to_thread.run_sync(index.digest, rec, self._target)
            else:  # no await per key: most payloads are small
                digest = index.digest(rec, self._target)
            if digest is not None and not k.force and digest == k.stored:
                out.unchanged.append(k)
            else:
                writes.append((k, rec, digest))
        # A crash after a storage call must not leave a digest naming a state storage lacks. An
        # absent key with no field has nothing to mark: no digest claims anything for it.
        await index.mark_unknown(
            self._r,
            self._cfg.own,
            [(k.db, k.key) for k, rec, _ in writes if not rec.tombstone or k.stored is not None],
        )
        # From here a write of ours may land after another holder's. Only the release can tell
        # whether the lease stayed ours; until it has, a retry of this round (the release lost
        # with its connection, say) must read and write these keys again rather than trust a
        # done marker or an index entry that the other holder advanced.
        for k, _, _ in writes:
            k.force = True
        if self._sink is not None:
            await self._write_segment(work, self._sink, writes, out)
            return out
        unavailable: list[Exception] = []
        pending = iter(writes)

        async def writer() -> None:
            for k, rec, digest in pending:
                await self._write(work, k, rec, digest, out, unavailable, in_flight)

        # A few writers taking turns at one list cost less than a task per key; more than
        # the limiter admits would only queue.
        async with anyio.create_task_group() as tg:
            for _ in range(min(self._cfg.concurrency, len(writes))):
                tg.start_soon(writer)
        if unavailable:
            raise unavailable[0]
        return out

    async def _write_segment(
        self,
        work: _Work,
        sink: SegmentSink,
        writes: list[tuple[_Key, KeyRecord, bytes | None]],
        out: _Outcome,
    ) -> None:
        """Hand ``writes`` to the segment sink and wait until their segment is durable.

        Tombstones are records too: a key's absence at a read is part of its history, which
        point-in-time restore replays. The keys' leases keep being renewed meanwhile: a late
        landing segment cannot hide a newer read, since readers take the highest stamp.
        """
        if not writes:
            return
        try:
            await sink.write([rec for _, rec, _ in writes])
        except ObjectRejected as exc:
            for k, _, _ in writes:
                out.failures[k] = f"storage rejected a segment: {exc}"
            if self._metrics is not None:
                self._metrics.error("upload", "ObjectRejected")
            return
        for k, rec, digest in writes:
            self._written(work, k, rec, digest, out)

    async def _read_one_by_one(self, db: int, keys: list[_Key]) -> list[KeyRecord | KeyReadError]:
        out: list[KeyRecord | KeyReadError] = []
        for k in keys:
            try:
                out += await self._source.read(db, [k.key], [k.max_id], [k.stamp])
            except ResponseError as exc:
                out.append(KeyReadError(k.key, f"source refused to read the key: {exc}"))
        return out

    async def _write(
        self,
        work: _Work,
        k: _Key,
        rec: KeyRecord,
        digest: bytes | None,
        out: _Outcome,
        unavailable: list[Exception],
        in_flight: set[_Key],
    ) -> None:
        prefix = self._cfg.path_prefix
        if self._cfg.versioning:
            name = version_name(prefix, k.db, k.key, rec.read_at_us, tombstone=rec.tombstone)
        else:
            name = latest_name(prefix, k.db, k.key)
        data = None if rec.tombstone and not self._cfg.versioning else await _encode(rec)
        try:
            # A free slot taken without awaiting saves a trip through the event loop per key.
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()
        in_flight.add(k)
        try:
            # fail_after() without its generator: this runs once per key.
            with anyio.CancelScope(deadline=anyio.current_time() + self._call_timeout) as scope:
                if data is None:
                    await self._storage.delete(name)
                else:
                    await self._storage.put(name, data)
        except ObjectRejected as exc:
            out.failures[k] = f"storage rejected {name}: {exc}"
            if self._metrics is not None:
                self._metrics.error("upload", "ObjectRejected")
            return
        except (StorageError, OSError) as exc:
            unavailable.append(exc)
            return
        finally:
            in_flight.discard(k)
            self._limiter.release()
        if scope.cancelled_caught:
            unavailable.append(
                StorageUnavailable(f"storage call for {name} took over {self._call_timeout} s")
            )
            return
        self._written(work, k, rec, digest, out)

    def _written(
        self, work: _Work, k: _Key, rec: KeyRecord, digest: bytes | None, out: _Outcome
    ) -> None:
        """Count ``k``'s state (or absence) as durable in storage: its own object, or a
        record of a segment."""
        out.written[k] = digest
        out.read_at_us.append(rec.read_at_us)
        if rec.tombstone:
            self._stats.deletes += 1
            work.tally["deletes"] += 1
        else:
            self._stats.puts += 1
            work.tally["puts"] += 1

    async def _flush(self) -> None:
        try:
            with anyio.fail_after(self._call_timeout):
                await self._storage.flush()
        except TimeoutError as exc:
            raise StorageUnavailable(f"storage flush took over {self._call_timeout} s") from exc

    async def _let_go(self, token: str, held: list[_Key]) -> None:
        """Release ``held`` without advancing markers, so others need not wait them out."""
        if not held:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            with contextlib.suppress(*TRANSIENT):
                await self._leases.release(token, [Release(k.db, k.hash) for k in held])

    def _settle(self, work: _Work, k: _Key, *, written: bool, read: bool = False) -> None:
        """``read`` and not ``written``: the key was read and found as storage holds it."""
        del work.keys[(k.db, k.key)]
        work.acks.extend(entry_id for entry_id, _ in k.entries)
        n = len(k.entries)
        self._stats.coalesced += n - 1 if written else n
        if written:
            return
        if read:
            self._stats.unchanged += 1
            work.tally["unchanged"] += 1
        else:
            work.tally["skipped"] += n

    def _failed(self, work: _Work, k: _Key, reason: str, now: float) -> None:
        k.attempts += 1
        if k.attempts >= self._cfg.max_attempts:
            del work.keys[(k.db, k.key)]
            work.dead.extend(DeadLetter(eid, f, reason, k.attempts) for eid, f in k.entries)
            return
        self._log.warning(
            "upload.key_failed", db=k.db, key=show_key(k.key), attempts=k.attempts, reason=reason
        )
        k.not_before = now + min(self._cfg.max_backoff, 0.1 * 2 ** (k.attempts - 1))

    async def _commit(self, work: _Work) -> None:
        """Dead-letter and acknowledge what the rounds so far settled."""
        cfg = self._cfg
        if work.dead:
            await deadletter.move(
                self._r,
                dead=cfg.own.dead,
                stream=cfg.own.stream,
                group=cfg.group,
                consumer=cfg.consumer,
                letters=work.dead,
            )
            for d in work.dead:
                self._log.warning(
                    "upload.dead_lettered",
                    entry=d.entry_id,
                    key=show_key(d.fields.get(b"key", b"")),
                    reason=d.reason,
                    attempts=d.attempts,
                )
            self._done_with([d.entry_id for d in work.dead])
            self._stats.dead_lettered += len(work.dead)
            work.tally["dead"] += len(work.dead)
            work.dead = []
        if work.acks:
            await self._r.xack(cfg.own.stream, cfg.group, *work.acks)
            self._done_with(work.acks)
            work.acks = []

    def _done_with(self, ids: list[str]) -> None:
        self._stats.entries_acked += len(ids)
        self._reader.done(ids)


async def _encode(rec: KeyRecord) -> bytes:
    if len(rec.payload) > _ENCODE_IN_THREAD:
        return await anyio.to_thread.run_sync(encode, rec)
    return encode(rec)
