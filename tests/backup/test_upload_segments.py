"""Uploaders of the segment layout against real redis-server processes: one object per
interval, acknowledged only once durable, and the newest read per key wins at reading time,
whatever order segments landed in."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest
from redis.asyncio import Redis

from rrb_streams.backup.upload import Uploader
from rrb_streams.errors import ConfigError
from rrb_streams.format import segment
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire.entries import entry_fields
from tests.support.dataset import restore_latest, snapshot
from tests.support.faulty import FaultyStorage
from tests.support.pipeline import drained, running
from tests.support.servers import RedisServer
from tests.support.uploading import (
    GROUP,
    STREAM,
    config,
    create_group,
    latest,
    note,
    pending,
    segment_records,
)
from tests.support.wait import until

pytestmark = pytest.mark.anyio


def segments(storage: MemoryStorage) -> list[str]:
    return sorted(n for n in storage.objects if segment.parse_segment_name(n) is not None)


def seg_config(server: RedisServer, **overrides: object) -> object:
    return config(server, **{"layout": "segments", "segment_interval": 0.2, **overrides})


async def test_segments_round_trip_every_type_and_record_deletes_as_tombstones(
    redis_server: RedisServer, redis_factory: object
) -> None:
    storage = MemoryStorage()
    u = Uploader(seg_config(redis_server), storage)  # type: ignore[arg-type]
    with redis_server.client() as c:
        c.set("s", "v")
        c.set("ttl", "t", px=600_000)
        c.hset("h", mapping={"f": b"\x00\xff"})
        c.rpush("l", *[str(i) for i in range(50)])
        c.sadd("set", *[str(i) for i in range(300)])
        c.zadd("z", {"a": 1.5})
        c.xadd("x", {"f": "v"})
        c.set(b"bin:\x00\xff", b"\x01")
        c.set("gone", "soon")
        note(c, *[k for k in c.scan_iter() if not k.startswith(b"rrb:")])
        async with running(u):
            await until(lambda: drained(c))
            c.delete("gone")
            note(c, "gone", ev="del")
            await until(lambda: drained(c))
        expected = snapshot(c)
    assert latest(storage, b"gone") is None
    tombstones = [r for r in segment_records(storage) if r.tombstone]
    assert [r.key for r in tombstones] == [b"gone"]
    assert len(segments(storage)) == 2  # one per burst, not one per key
    assert u.stats.segments == 2 and u.stats.segment_records == 10
    assert storage.puts == 2
    assert callable(redis_factory)
    scratch: RedisServer = redis_factory()
    with scratch.client() as t:
        assert await restore_latest(storage, t) == len(expected)
        assert snapshot(t) == expected


async def test_a_failed_fsync_acknowledges_nothing_and_is_retried(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.fail_next(2, "flush")
    u = Uploader(seg_config(redis_server), storage)  # type: ignore[arg-type]
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with running(u):
            await until(lambda: storage.failures["flush"] == 2)
            assert u.entries_acked == 0
            await until(lambda: drained(c))
    assert latest(inner, b"k") is not None and u.dead_lettered == 0
    # Segments whose flush failed may exist: harmless, the same read or an older one.
    assert u.stats.segments == 1


async def test_a_storage_outage_acknowledges_nothing_early_and_recovers(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    storage.down = True
    keys = [f"k{i}" for i in range(10)]
    u = Uploader(seg_config(redis_server), storage)  # type: ignore[arg-type]
    with redis_server.client() as c:
        for k in keys:
            c.set(k, k)
        note(c, *keys)
        async with running(u):
            await until(lambda: storage.failures["put"] >= 3)
            assert pending(c) == len(keys) and u.entries_acked == 0 and inner.objects == {}
            storage.down = False
            await until(lambda: drained(c))
    assert all(latest(inner, k.encode()) is not None for k in keys)


async def test_the_entries_of_a_dead_consumer_are_claimed_into_segments(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        create_group(c)
        for k in ("a", "b", "c"):
            c.set(k, k)
        note(c, "a", "b", "c")
        assert len(c.xreadgroup(GROUP, "dead", {STREAM: ">"})[0][1]) == 3  # never acked
        u = Uploader(seg_config(redis_server, claim_idle=0.3), storage)  # type: ignore[arg-type]
        async with running(u):
            await until(lambda: drained(c), within=5)
    assert u.claimed == 3
    assert {r.key for r in segment_records(storage)} == {b"a", b"b", b"c"}


async def test_puts_do_not_grow_with_the_change_rate(redis_server: RedisServer) -> None:
    """2,000 distinct keys changed within about a second: a handful of PUTs, not 2,000."""
    storage = MemoryStorage()
    u = Uploader(seg_config(redis_server, segment_interval=1.0), storage)  # type: ignore[arg-type]
    r = Redis.from_url(redis_server.url())
    try:
        async with running(u):
            for start in range(0, 2000, 100):
                pipe = r.pipeline(transaction=False)
                for i in range(start, start + 100):
                    pipe.set(f"k{i}", i)
                    pipe.xadd(STREAM, entry_fields(0, b"k%d" % i, "set", 0))  # type: ignore[arg-type]
                await pipe.execute()
                await anyio.sleep(0.05)
            with redis_server.client() as c:
                await until(lambda: drained(c))
    finally:
        await r.aclose()
    assert len({r.key for r in segment_records(storage)}) == 2000
    print(f"2,000 changes -> {storage.puts} PUTs")
    assert storage.puts <= 20


async def test_a_hot_key_raced_by_four_uploaders_ends_on_the_final_value(
    redis_server: RedisServer,
) -> None:
    changes, chunk = 3000, 25
    storage = MemoryStorage()
    uploaders = [
        Uploader(seg_config(redis_server, consumer=f"u{i}", linger=0.05), storage)  # type: ignore[arg-type]
        for i in range(4)
    ]
    r = Redis.from_url(redis_server.url())
    try:
        async with running(*uploaders, within=60):
            for _ in range(changes // chunk):
                pipe = r.pipeline(transaction=False)
                for _ in range(chunk):
                    pipe.incr("hot")
                    pipe.xadd(STREAM, entry_fields(0, b"hot", "incrby", 0))  # type: ignore[arg-type]
                await pipe.execute()
                await anyio.sleep(0.005)
            with redis_server.client() as c:
                await until(lambda: drained(c), within=20)
        with redis_server.client() as c:
            rec = latest(storage, b"hot")
            assert rec is not None
            c.restore("check", 0, rec.payload, replace=True)
            assert c.get("check") == c.get("hot") == str(changes).encode()
    finally:
        await r.aclose()
    records = [rec for rec in segment_records(storage) if rec.key == b"hot"]
    stamps = [rec.stamp for rec in records]
    assert len(set(stamps)) == len(stamps), "two reads of one key shared a stamp"
    assert sum(u.entries_acked for u in uploaders) == changes


async def test_a_stale_segment_landing_late_never_hides_the_newer_read(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    slow_storage = FaultyStorage(inner)
    slow_storage.hang("put")
    slow = Uploader(  # type: ignore[arg-type]
        seg_config(redis_server, consumer="slow", lease=0.5, concurrency=1), slow_storage
    )
    fast = Uploader(seg_config(redis_server, consumer="fast", lease=0.5), inner)  # type: ignore[arg-type]
    with redis_server.client() as c:
        c.set("k", "v1")
        note(c, "k")
        async with running(slow):
            await slow_storage.wait_hanging("put")  # slow read v1 and is writing it
            c.set("k", "v2")
            fresh = c.dump("k")
            pipe = c.pipeline(transaction=True)
            pipe.xadd(STREAM, entry_fields(0, b"k", "set", 0))  # type: ignore[arg-type]
            pipe.xreadgroup(GROUP, "fast", {STREAM: ">"})
            pipe.execute()
            async with running(fast):
                await until(lambda: getattr(latest(inner, b"k"), "payload", None) == fresh)
                before = len(segments(inner))
                slow_storage.release("put")  # the stale v1 lands after v2...
                await until(lambda: len(segments(inner)) > before)
                rec = latest(inner, b"k")
                # ...and loses at once: its stamp is older, whatever order they landed in.
                assert rec is not None and rec.payload == fresh
                await until(lambda: drained(c))
    rec = latest(inner, b"k")
    assert rec is not None and rec.payload == fresh


class _GhostWrites(MemoryStorage):
    """A put that times out on the client, while the server commits it later: the residual
    case of the keys layout. ``ghost`` puts hang (the client gives up) and land ``later``."""

    def __init__(self) -> None:
        super().__init__()
        self.ghosts = 1
        self.landed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def put(self, name: str, data: bytes) -> None:
        if self.ghosts > 0 and self._tg is not None:
            self.ghosts -= 1
            self._tg.start_soon(self._land_later, name, data)
            await anyio.sleep_forever()  # the client's timeout ends this
        await super().put(name, data)

    async def _land_later(self, name: str, data: bytes) -> None:
        await self.landed_after.wait()
        await MemoryStorage.put(self, name, data)
        self.landed.set()

    landed_after = anyio.Event()


async def test_a_write_committed_after_the_client_gave_up_cannot_hide_a_newer_state(
    redis_server: RedisServer,
) -> None:
    storage = _GhostWrites()
    storage.landed_after = anyio.Event()
    # lease 0.25 s: a storage call is given up after four leases, 1 s.
    u = Uploader(seg_config(redis_server, lease=0.25), storage)  # type: ignore[arg-type]
    with redis_server.client() as c:
        c.set("k", "v1")
        note(c, "k")
        async with anyio.create_task_group() as tg:
            storage._tg = tg
            async with running(u):
                await until(lambda: storage.ghosts == 0)
                c.set("k", "v2")  # changed while the ghost write of v1 is in flight
                fresh = c.dump("k")
                note(c, "k")
                await until(lambda: drained(c), within=10)
                assert getattr(latest(storage, b"k"), "payload", None) == fresh
                storage.landed_after.set()  # now the server commits the old v1 segment
                await storage.landed.wait()
            rec = latest(storage, b"k")
            assert rec is not None and rec.payload == fresh  # v1 landed last and lost
            ghost = min(segments(storage))  # the oldest stamps: the first read's segment
            assert ghost in storage.objects and len(segments(storage)) >= 2


def test_versioning_is_refused_with_segments(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="--versioning needs --layout keys"):
        config(redis_server, layout="segments", versioning=True)
    assert replace(config(redis_server, layout="keys", versioning=True)).versioning
