"""BatchProcessor against a real redis-server (source and stream Redis in one), built as
Uploader.run builds it and fed entries that the test adds and reads through the group."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from rrb_streams.backup.batch import Batch, BatchProcessor
from rrb_streams.backup.lease import Leases, Release
from rrb_streams.backup.metrics import UploadStats
from rrb_streams.config import UploadConfig
from rrb_streams.format import codec
from rrb_streams.format.layout import key_hash, latest_name
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire import index
from rrb_streams.wire.connections import connect
from rrb_streams.wire.entries import entry_fields, now_ms
from rrb_streams.wire.group import GroupReader, RawEntry, ensure_group
from rrb_streams.wire.keys import DEFAULT_GROUP, OwnKeys
from rrb_streams.wire.source import Source
from tests.support.faulty import FaultyStorage
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

OWN = OwnKeys()
STREAM, DEAD, GROUP, CONSUMER = OWN.stream, OWN.dead, DEFAULT_GROUP, "u1"
TARGET = index.storage_target("memory://", "", versioning=False)
Factory = Callable[..., RedisServer]
Logs = Sequence[MutableMapping[str, Any]]


def events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


@dataclass
class Rig:
    """One BatchProcessor and everything around it, as ``Uploader.run`` wires them."""

    cfg: UploadConfig
    r: Redis  # the stream Redis
    src: Redis  # a client of the source's db 0, for the test's own writes
    memory: MemoryStorage
    storage: FaultyStorage
    reader: GroupReader
    stats: UploadStats
    limiter: anyio.CapacityLimiter
    processor: BatchProcessor

    async def note(self, *keys: bytes | str, db: int = 0, ev: str = "set") -> list[str]:
        """Add one change entry per key, as the bridge would."""
        ids = []
        for key in keys:
            raw = key.encode() if isinstance(key, str) else key
            ids.append(await self.add(entry_fields(db, raw, ev, now_ms())))
        return ids

    async def add(self, fields: dict[bytes, bytes]) -> str:
        return text(await self.r.xadd(STREAM, fields))  # type: ignore[arg-type]

    async def read(self, count: int = 1000) -> list[RawEntry]:
        """Read new entries through the group: they are pending, and in hand."""
        return await self.reader.read(count, None)

    async def deliver(self, *keys: bytes | str, db: int = 0, ev: str = "set") -> list[RawEntry]:
        await self.note(*keys, db=db, ev=ev)
        return await self.read()

    async def process(self, entries: Iterable[RawEntry], *, redo: bool = False) -> None:
        with anyio.fail_after(15):
            await self.processor.process(Batch(list(entries), redo=redo))

    async def pending(self) -> int:
        return int((await self.r.xpending(STREAM, GROUP))["pending"])

    async def dead(self) -> list[dict[bytes, bytes]]:
        """The dead letters' fields."""
        return [cast(dict[bytes, bytes], fields) for _, fields in await self.r.xrange(DEAD) or []]

    async def calls(self, command: str) -> int:
        """How many times the server ran ``command`` since it started."""
        stats = await self.r.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    async def indexed(self, key: bytes, db: int = 0) -> bytes | None:
        value = await self.r.hget(OWN.index(db), key)
        return None if value is None else cast(bytes, value)

    async def done_marker(self, key: bytes, db: int = 0) -> str | None:
        value = await self.r.get(OWN.done(db, key_hash(key)))
        return None if value is None else text(value)

    def latest(self, key: bytes, db: int = 0) -> codec.KeyRecord | None:
        data = self.memory.objects.get(latest_name("", db, key))
        return None if data is None else codec.decode(data)


@asynccontextmanager
async def rig(
    server: RedisServer,
    *,
    source_url: str | None = None,
    stream: RedisServer | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    metrics: Metrics | None = None,
    memory: MemoryStorage | None = None,
    **overrides: Any,
) -> AsyncIterator[Rig]:
    """A processor whose source is ``server`` (through ``source_url`` when given: another
    user, say) and whose stream Redis is ``stream`` (``server`` by default). Its storage
    wraps ``memory`` (a new one by default), so two rigs may share what they store."""
    settings: dict[str, Any] = {
        "layout": "keys",  # the processor writes one object per key without a segment sink
        "consumer": CONSUMER,
        "concurrency": 2,
        "linger": 0.01,
        "lease": 5.0,
        "max_attempts": 2,
        "max_backoff": 0.05,
    }
    settings.update(overrides)
    stream_url = None if stream is None else stream.url()
    cfg = UploadConfig(source_url=server.url(), stream_url=stream_url, **settings).validate()
    r = connect(cfg.effective_stream_url)
    src = connect(server.url())
    source = Source(source_url or cfg.source_url)
    memory = memory or MemoryStorage()
    storage = FaultyStorage(memory)
    try:
        await source.check()
        await ensure_group(r, STREAM, GROUP)
        reader = GroupReader(r, STREAM, GROUP, CONSUMER)
        stats = UploadStats()
        limiter = limiter or anyio.CapacityLimiter(cfg.concurrency)
        log = get_logger("upload", consumer=cfg.consumer, stream=STREAM)
        leases = Leases(r, cfg.own, STREAM, lease_s=cfg.lease)
        processor = BatchProcessor(
            cfg, storage, r, source, leases, limiter, stats, reader, log, metrics
        )
        yield Rig(cfg, r, src, memory, storage, reader, stats, limiter, processor)
    finally:
        storage.release()
        with anyio.CancelScope(shield=True):
            await source.close()
            await src.aclose()
            await r.aclose()


@asynccontextmanager
async def in_background(h: Rig, entries: Sequence[RawEntry]) -> AsyncIterator[anyio.Event]:
    """``process(Batch(entries))`` running during the block; the event is set once it
    returned. The block must see it return (or cancel it)."""
    finished = anyio.Event()

    async def run() -> None:
        await h.process(entries)
        finished.set()

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            yield finished


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ids(entries: Iterable[RawEntry]) -> set[str]:
    return {entry_id for entry_id, _ in entries}


# -- entries that need no write -------------------------------------------------------------


async def test_batch_acks_own_keys_and_deleted_entries_without_a_write(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        own = await h.deliver(OWN.lease(0, "abc"), "rrb:anything")
        [(gone_id, _)] = await h.deliver("k")
        await h.r.xdel(STREAM, gone_id)
        # As the group hands out an entry deleted from the stream while pending:
        entries = [*own, (gone_id, {})]
        with capture_logs() as logs:
            await h.process(entries)
        assert await h.pending() == 0
        assert h.reader.in_hand == set()
        assert sum(h.storage.calls.values()) == 0
        assert await h.calls("dump") == 0
        assert await h.r.keys(f"{OWN.prefix}done:*") == []
        assert (h.stats.entries_acked, h.stats.puts, h.stats.coalesced) == (3, 0, 0)
    [written] = events(logs, "upload.batch_written")
    assert (written["entries"], written["keys"], written["skipped"], written["puts"]) == (
        3,
        0,
        3,
        0,
    )


async def test_batch_dead_letters_malformed_entries_with_their_reason(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("good", "v")
        foreign = await h.add({b"foo": b"bar"})
        bad_db = await h.add({b"db": b"x", b"key": b"k"})
        negative = await h.add({b"db": b"-1", b"key": b"k"})
        await h.note("good")
        entries = await h.read()
        with capture_logs() as logs:
            await h.process(entries)
        dead = {d[b"entry"].decode(): d for d in await h.dead()}
        assert set(dead) == {foreign, bad_db, negative}
        assert all(b"malformed change entry" in d[b"reason"] for d in dead.values())
        assert b"db -1" in dead[negative][b"reason"]
        assert all(d[b"attempts"] == b"1" and d[b"consumer"] == b"u1" for d in dead.values())
        assert dead[foreign][b"foo"] == b"bar", "the original fields are kept"
        assert await h.pending() == 0
        assert h.latest(b"good") is not None
        assert (h.stats.dead_lettered, h.stats.entries_acked, h.stats.puts) == (3, 4, 1)
        assert h.reader.in_hand == set()
    assert len(events(logs, "upload.dead_lettered")) == 3
    [written] = events(logs, "upload.batch_written")
    assert (written["dead_lettered"], written["puts"]) == (3, 1)


# -- reads and writes -----------------------------------------------------------------------


async def test_batch_coalesces_many_entries_of_one_key_into_one_read_and_one_write(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    async with rig(redis_server, metrics=metrics) as h:
        await h.src.set("hot", "v1")
        await h.src.set("cold", "c")
        hot_ids = await h.note("hot", "hot", "hot", "hot", "hot")
        await h.note("cold")
        entries = await h.read()
        execs = await h.calls("exec")
        with capture_logs() as logs:
            await h.process(entries)
        assert h.storage.calls["put"] == 2
        assert await h.calls("dump") == 2, "one read per key"
        assert await h.calls("exec") == execs + 1, "one transaction for the db"
        assert (h.stats.puts, h.stats.coalesced, h.stats.entries_acked) == (2, 4, 6)
        rec = h.latest(b"hot")
        assert rec is not None
        assert rec.entry_id == hot_ids[-1]
        assert rec.payload == await h.src.dump("hot")
        assert await h.pending() == 0
    lag = metrics.registry.get_sample_value("rrb_upload_lag_seconds_count")
    assert lag == 2
    [written] = events(logs, "upload.batch_written")
    assert (written["entries"], written["keys"], written["puts"]) == (6, 2, 2)


async def test_batch_reads_each_db_in_one_transaction(redis_server: RedisServer) -> None:
    async with rig(redis_server) as h:
        await h.src.mset({"a": "0", "b": "0"})
        with redis_server.client(1) as c1:
            c1.set("c", "1")
            await h.note("a", "b")
            await h.note("c", db=1)
            entries = await h.read()
            execs = await h.calls("exec")
            await h.process(entries)
            assert await h.calls("exec") == execs + 2
            rec = h.latest(b"c", db=1)
            assert rec is not None and rec.db == 1 and rec.payload == c1.dump("c")
        assert h.latest(b"a") is not None and h.latest(b"b") is not None
        assert h.latest(b"c") is None
        assert h.stats.puts == 3


async def test_batch_deletes_the_object_of_a_key_gone_from_the_source(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        await h.process(await h.deliver("k"))
        assert h.latest(b"k") is not None
        assert await h.indexed(b"k") not in (None, index.UNKNOWN)
        await h.src.delete("k")
        with capture_logs() as logs:
            await h.process(await h.deliver("k", "never-existed", ev="del"))
        assert h.memory.objects == {}
        assert h.storage.calls["delete"] == 2
        assert (h.stats.deletes, h.stats.puts) == (2, 1)
        assert await h.indexed(b"k") is None, "an absent key leaves the index"
        assert await h.indexed(b"never-existed") is None
        assert await h.pending() == 0
    [written] = events(logs, "upload.batch_written")
    assert (written["deletes"], written["puts"]) == (2, 0)


async def test_batch_versioning_writes_a_tombstone_for_an_absent_key(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server, versioning=True) as h:
        await h.src.set("k", "v")
        await h.process(await h.deliver("k"))
        await h.src.delete("k")
        await h.process(await h.deliver("k", ev="del"))
        names = sorted(h.memory.objects)
        assert len(names) == 2
        assert names[1].endswith(".tombstone")
        assert codec.decode(h.memory.objects[names[1]]).tombstone
        assert h.storage.calls["delete"] == 0
        assert (h.stats.puts, h.stats.deletes) == (1, 1)


async def test_batch_stores_the_digest_of_what_it_wrote_in_the_index(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v", px=600_000)
        await h.process(await h.deliver("k"))
        rec = h.latest(b"k")
        assert rec is not None and rec.expire_at_ms is not None
        assert await h.indexed(b"k") == index.digest(rec, TARGET)


# -- what a done marker and the index spare -------------------------------------------------


async def test_batch_acks_an_entry_its_done_marker_covers_without_a_read(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        first, second = await h.note("k", "k")
        await h.process(await h.read(1))
        # The marker is the stream's tail when the lease was taken: the later entry too.
        assert await h.done_marker(b"k") == second
        dumps = await h.calls("dump")
        coalesced = h.stats.coalesced
        [entry] = await h.read(1)
        assert entry[0] == second
        with capture_logs() as logs:
            await h.process([entry])
        assert await h.calls("dump") == dumps, "no read"
        assert h.storage.calls["put"] == 1, "no write"
        assert h.stats.coalesced == coalesced + 1
        assert await h.pending() == 0
        assert first != second
    [written] = events(logs, "upload.batch_written")
    assert (written["skipped"], written["puts"], written["unchanged"]) == (1, 0, 0)


async def test_batch_does_not_rewrite_a_key_whose_digest_the_index_holds(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        await h.process(await h.deliver("k"))
        digest = await h.indexed(b"k")
        dumps = await h.calls("dump")
        again = await h.deliver("k")
        with capture_logs() as logs:
            await h.process(again)
        assert await h.calls("dump") == dumps + 1, "read, since no marker covers the entry"
        assert h.storage.calls["put"] == 1, "but not written"
        assert h.stats.unchanged == 1
        assert await h.indexed(b"k") == digest
        assert await h.done_marker(b"k") == again[0][0]
        assert await h.pending() == 0
        await h.src.set("k", "changed")
        await h.process(await h.deliver("k"))
        assert h.storage.calls["put"] == 2
        assert await h.indexed(b"k") != digest
    [written] = events(logs, "upload.batch_written")
    assert (written["unchanged"], written["puts"], written["skipped"]) == (1, 0, 0)


async def test_batch_redo_writes_even_what_the_done_marker_and_the_index_cover(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        await h.note("k", "k")
        await h.process(await h.read(1))
        dumps = await h.calls("dump")
        claimed = await h.read(1)
        await h.process(claimed, redo=True)
        assert await h.calls("dump") == dumps + 1
        assert h.storage.calls["put"] == 2
        assert h.stats.unchanged == 0
        assert await h.pending() == 0


# -- failures of one key --------------------------------------------------------------------


async def test_batch_dead_letters_a_rejected_object_after_max_attempts(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    rejected = latest_name("", 0, b"bad")
    async with rig(redis_server, metrics=metrics, max_attempts=2) as h:
        await h.src.mset({"bad": "v", "good": "v"})
        h.storage.reject = lambda name: name == rejected
        bad_ids = await h.note("bad", "bad")
        await h.note("good")
        with capture_logs() as logs:
            await h.process(await h.read())
        assert h.storage.failures["put"] == 2, "tried max_attempts times"
        dead = await h.dead()
        assert sorted(d[b"entry"].decode() for d in dead) == sorted(bad_ids)
        assert all(d[b"attempts"] == b"2" for d in dead)
        assert all(d[b"reason"].startswith(b"storage rejected " + rejected.encode()) for d in dead)
        assert h.latest(b"good") is not None
        assert await h.pending() == 0
        assert (h.stats.dead_lettered, h.stats.puts, h.stats.entries_acked) == (2, 1, 3)
    [failed] = events(logs, "upload.key_failed")
    assert (failed["key"], failed["attempts"]) == ("bad", 1)
    assert not events(logs, "upload.retry"), "a rejection is not a transient failure"
    errors = metrics.registry.get_sample_value(
        "rrb_errors_total", {"component": "upload", "kind": "ObjectRejected"}
    )
    assert errors == 2


async def test_batch_dead_letters_a_key_the_source_refuses_to_read(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    with redis_server.client() as c:
        c.acl_setuser(
            "upload", enabled=True, passwords=["+pw"], keys=["allowed:*"], commands=["+@all"]
        )
    user_url = f"redis://upload:pw@127.0.0.1:{redis_server.port}/0"
    async with rig(redis_server, source_url=user_url, metrics=metrics) as h:
        await h.src.mset({"allowed:1": "v", "secret:1": "v"})
        [secret] = await h.note("secret:1")
        await h.note("allowed:1")
        await h.process(await h.read())
        assert h.latest(b"allowed:1") is not None, "the key at fault fails alone"
        [dead] = await h.dead()
        assert dead[b"entry"].decode() == secret
        assert dead[b"reason"].startswith(b"source refused to read the key")
        assert dead[b"attempts"] == b"2"
        assert await h.pending() == 0
    errors = metrics.registry.get_sample_value(
        "rrb_errors_total", {"component": "upload", "kind": "KeyReadError"}
    )
    assert errors == 2


async def test_batch_dead_letters_an_entry_for_a_db_the_source_lacks(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        [beyond] = await h.note("k", db=99)  # the server has 16
        await h.note("k")
        with capture_logs() as logs:
            await h.process(await h.read())
        [dead] = await h.dead()
        assert dead[b"entry"].decode() == beyond
        assert b"DB index is out of range" in dead[b"reason"]
        assert h.latest(b"k") is not None
        assert await h.pending() == 0
    assert not events(logs, "upload.retry"), "retrying cannot fix it"


# -- transient failures ---------------------------------------------------------------------


async def test_batch_retries_a_storage_outage_and_acks_nothing_before_storage_confirms(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    async with rig(redis_server, metrics=metrics) as h:
        await h.src.mset({"a": "v", "b": "v"})
        entries = await h.deliver("a", "b")
        h.storage.down = True
        with capture_logs() as logs:
            async with in_background(h, entries) as finished:
                await until(lambda: len(events(logs, "upload.retry")) >= 2)
                assert await h.pending() == 2
                assert h.reader.in_hand == ids(entries)
                h.storage.down = False
                await finished.wait()
        assert await h.pending() == 0
        assert h.reader.in_hand == set()
        assert h.latest(b"a") is not None and h.latest(b"b") is not None
        assert h.stats.entries_acked == 2
    retries = events(logs, "upload.retry")
    assert {e["stage"] for e in retries} == {"batch"}
    assert [e["consecutive_errors"] for e in retries[:2]] == [1, 2]
    assert retries[0]["error"].startswith("StorageUnavailable")
    [recovered] = events(logs, "upload.recovered")
    assert recovered["stage"] == "batch"
    retried = metrics.registry.get_sample_value("rrb_retries_total", {"component": "upload"})
    assert retried == len(retries)


@pytest.mark.parametrize("method", ["put", "flush"])
async def test_batch_acks_nothing_while_a_storage_call_hangs(
    redis_server: RedisServer, method: str
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        entries = await h.deliver("k")
        h.storage.hang("put" if method == "put" else "flush")
        async with in_background(h, entries) as finished:
            await h.storage.wait_hanging("put" if method == "put" else "flush")
            assert await h.pending() == 1
            assert h.reader.in_hand == ids(entries)
            # A crash now must not leave a digest that claims a state storage may lack.
            assert await h.indexed(b"k") == index.UNKNOWN
            assert await h.done_marker(b"k") is None
            h.storage.release()
            await finished.wait()
        assert await h.pending() == 0
        assert h.reader.in_hand == set()
        rec = h.latest(b"k")
        assert rec is not None and await h.indexed(b"k") == index.digest(rec, TARGET)


async def test_batch_marks_unknown_only_keys_the_index_may_name(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("was", "v")
        await h.process(await h.deliver("was"))
        await h.src.delete("was")
        entries = await h.deliver("was", "never", ev="del")
        h.storage.hang("delete")
        async with in_background(h, entries) as finished:
            await h.storage.wait_hanging("delete", 2)
            assert await h.indexed(b"was") == index.UNKNOWN
            assert not await h.r.hexists(OWN.index(0), "never")
            h.storage.release()
            await finished.wait()
        assert await h.r.hlen(OWN.index(0)) == 0


async def test_batch_timed_out_storage_call_is_retried_as_transient(
    redis_server: RedisServer,
) -> None:
    # A storage call is given up after CALL_TIMEOUT_LEASES leases: 0.4 s here.
    async with rig(redis_server, lease=0.1) as h:
        await h.src.set("k", "v")
        entries = await h.deliver("k")
        h.storage.hang("put")
        with capture_logs() as logs:
            async with in_background(h, entries) as finished:
                await until(lambda: events(logs, "upload.retry"))
                assert await h.pending() == 1
                h.storage.release()
                await finished.wait()
        assert "took over" in events(logs, "upload.retry")[0]["error"]
        assert await h.pending() == 0
        assert h.latest(b"k") is not None


async def test_batch_retries_when_the_source_is_down(redis_factory: Factory) -> None:
    source, stream = redis_factory(), redis_factory()
    async with rig(source, stream=stream) as h:
        await h.src.set("k", "before")
        entries = await h.deliver("k")
        source.stop()
        with capture_logs() as logs:
            async with in_background(h, entries) as finished:
                await until(lambda: events(logs, "upload.retry"), within=30)
                assert await h.pending() == 1
                # Blocking calls: no round can read the fresh, empty source before the set.
                source.start()
                with source.client() as c:
                    c.set("k", "after")
                await finished.wait()
        rec = h.latest(b"k")
        assert rec is not None
        with source.client() as c:
            assert rec.payload == c.dump("k")
        assert await h.pending() == 0
    assert events(logs, "upload.retry")[0]["stage"] == "batch"
    assert len(events(logs, "upload.recovered")) == 1


async def test_batch_cancelled_leaves_its_entries_pending_and_its_leases_free(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.set("k", "v")
        entries = await h.deliver("k")
        h.storage.hang("put")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.process, entries)
                await h.storage.wait_hanging("put")
                assert await h.r.exists(OWN.lease(0, key_hash(b"k"))) == 1
                tg.cancel_scope.cancel()
        assert await h.pending() == 1
        assert await h.r.exists(OWN.lease(0, key_hash(b"k"))) == 0
        assert await h.done_marker(b"k") is None


# -- leases ---------------------------------------------------------------------------------


async def test_batch_writes_a_key_once_the_lease_another_uploader_holds_is_released(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        other = Leases(h.r, OWN, STREAM, lease_s=30)
        [grant], _ = await other.acquire([(0, key_hash(b"busy"))], "other-token")
        assert grant.held
        await h.src.mset({"busy": "v1", "free": "v"})
        entries = await h.deliver("busy", "free")
        with capture_logs() as logs:
            async with in_background(h, entries) as finished:
                await until(lambda: h.latest(b"free") is not None)
                await until(lambda: h.stats.entries_acked == 1)
                assert await h.pending() == 1, "the free key is not held back"
                assert h.latest(b"busy") is None
                await h.src.set("busy", "v2")  # the other uploader's change
                await other.release("other-token", [Release(0, key_hash(b"busy"))])
                await finished.wait()
        rec = h.latest(b"busy")
        assert rec is not None and rec.payload == await h.src.dump("busy"), "read after"
        assert await h.pending() == 0
        assert h.stats.redone == 0
    [written] = events(logs, "upload.batch_written")
    assert written["puts"] == 2


async def test_batch_redoes_a_key_whose_lease_was_lost_during_its_write(
    redis_server: RedisServer,
) -> None:
    lease = OWN.lease(0, key_hash(b"k"))
    async with rig(redis_server) as h, rig(redis_server, memory=h.memory, consumer="u2") as h2:
        await h.src.set("k", "v1")
        entries = await h.deliver("k")
        h.storage.hang("put")
        with capture_logs() as logs:
            async with in_background(h, entries) as finished:
                await h.storage.wait_hanging("put")
                await h.r.delete(lease)  # our write outlasted our lease ...
                await h.src.set("k", "v2")
                await h2.process(await h2.deliver("k"))  # ... and another uploader wrote v2
                newer = h.latest(b"k")
                assert newer is not None and newer.payload == await h.src.dump("k")
                h.storage.release()  # our stale write of v1 lands after theirs
                await finished.wait()
        # The redo wrote again, although the done marker and the index covered the key.
        assert h.storage.calls["put"] == 2
        rec = h.latest(b"k")
        assert rec is not None and rec.payload == newer.payload
        assert rec.read_at_us > newer.read_at_us
        assert h.stats.redone == 1
        assert await h.pending() == 0
        assert await h.indexed(b"k") == index.digest(rec, TARGET)
    [lost] = events(logs, "upload.lease_lost")
    assert lost["key"] == "k"
    written = events(logs, "upload.batch_written")
    assert [w["redone"] for w in written] == [0, 1]


async def test_batch_rewrites_a_key_whose_round_failed_after_its_write(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host cut off mid-round: our stale write lands after another uploader's, and the
    # connection drops before our release could tell us the lease was lost. The retried round
    # must not trust the done marker the other uploader advanced.
    lease = OWN.lease(0, key_hash(b"k"))
    async with rig(redis_server) as h, rig(redis_server, memory=h.memory, consumer="u2") as h2:
        await h.src.set("k", "v1")
        entries = await h.deliver("k")
        leases = h.processor._leases
        release = leases.release
        lost: list[bool] = []

        async def release_after_a_lost_connection(token: str, items: Any) -> list[bool]:
            if not lost:
                lost.append(True)
                raise RedisConnectionError("connection lost before the release")
            return await release(token, items)

        monkeypatch.setattr(leases, "release", release_after_a_lost_connection)
        h.storage.hang("put")
        async with in_background(h, entries) as finished:
            await h.storage.wait_hanging("put")
            await h.r.delete(lease)  # our lease lapsed while we were cut off ...
            await h.src.set("k", "v2")
            await h2.process(await h2.deliver("k"))  # ... and another uploader wrote v2
            newer = h.latest(b"k")
            assert newer is not None
            h.storage.release()  # our stale v1 lands after v2; then the release fails
            await finished.wait()
        assert lost == [True]
        rec = h.latest(b"k")
        assert rec is not None and rec.payload == await h.src.dump("k")
        assert rec.read_at_us > newer.read_at_us
        assert await h.pending() == 0


# -- concurrency ----------------------------------------------------------------------------


async def test_batch_writes_with_up_to_concurrency_writers(redis_server: RedisServer) -> None:
    async with rig(redis_server, concurrency=3) as h:
        await h.src.mset({"a": "v", "b": "v", "c": "v", "d": "v"})
        entries = await h.deliver("a", "b", "c", "d")
        h.storage.hang("put")
        async with in_background(h, entries) as finished:
            await h.storage.wait_hanging("put", 3)
            await anyio.wait_all_tasks_blocked()
            assert h.storage.hanging["put"] == 3
            h.storage.release()
            await finished.wait()
        assert h.stats.puts == 4


async def test_batch_storage_calls_share_the_process_wide_limiter(
    redis_server: RedisServer,
) -> None:
    limiter = anyio.CapacityLimiter(1)
    async with rig(redis_server, concurrency=4, limiter=limiter) as h:
        await h.src.mset({"a": "v", "b": "v", "c": "v"})
        entries = await h.deliver("a", "b", "c")
        h.storage.hang("put")
        async with in_background(h, entries) as finished:
            await h.storage.wait_hanging("put")
            await anyio.wait_all_tasks_blocked()
            assert h.storage.hanging["put"] == 1
            assert limiter.statistics().tasks_waiting == 2
            h.storage.release()
            await finished.wait()
        assert h.stats.puts == 3
        assert limiter.borrowed_tokens == 0


# -- what it reports ------------------------------------------------------------------------


async def test_batch_counts_each_outcome_in_stats_and_the_batch_log(
    redis_server: RedisServer,
) -> None:
    async with rig(redis_server) as h:
        await h.src.mset({"same": "v", "covered": "v", "new": "v"})
        await h.note("same", "covered", "covered")
        await h.process(await h.read(2))  # the markers now cover the third entry
        before = UploadStats(**{f: getattr(h.stats, f) for f in h.stats.__slots__})
        await h.note("same", "new", "absent", "rrb:own")
        await h.add({b"not": b"a change"})
        entries = await h.read()
        assert len(entries) == 6
        with capture_logs() as logs:
            await h.process(entries)
        after = h.stats
        assert after.puts - before.puts == 1  # new
        assert after.deletes - before.deletes == 1  # absent
        assert after.unchanged - before.unchanged == 1  # same
        assert after.coalesced - before.coalesced == 2  # covered, same
        assert after.dead_lettered - before.dead_lettered == 1
        assert after.entries_acked - before.entries_acked == 6
        assert after.redone == 0
        assert await h.pending() == 0
    [written] = events(logs, "upload.batch_written")
    assert {k: written[k] for k in ("entries", "keys", "puts", "deletes", "unchanged")} == {
        "entries": 6,
        "keys": 4,
        "puts": 1,
        "deletes": 1,
        "unchanged": 1,
    }
    assert (written["skipped"], written["redone"], written["dead_lettered"]) == (2, 0, 1)
    assert written["seconds"] >= 0
