"""The stored-keys index: deletions made during gaps reach storage, unchanged keys cost no PUT."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from rrb_streams.backup.upload import Uploader
from rrb_streams.format import codec
from rrb_streams.format.layout import latest_name
from rrb_streams.storage.fs import FsStorage
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire.index import UNKNOWN, absent_page, digest, exist_on, storage_target
from tests.support.dataset import latest_records
from tests.support.faulty import FaultyStorage
from tests.support.pipeline import drained, running, running_pipeline, wait_drained
from tests.support.servers import RedisServer
from tests.support.uploading import GROUP, OWN, STREAM, config, create_group, latest, note
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]


def indexed(c: redis.Redis, db: int = 0) -> dict[bytes, bytes]:
    return dict(c.hgetall(OWN.index(db)))


async def backed_up(
    source: RedisServer, storage: MemoryStorage, layout: str = "keys", **options: Any
) -> None:
    """Run a bridge and an uploader until the stream drained, then stop both."""
    stream_url = options.pop("stream_url", None)
    async with running_pipeline(
        source.url(), storage, stream_url=stream_url, bridge=options, upload={"layout": layout}
    ):
        await wait_drained(stream_url or source.url())


async def live(storage: MemoryStorage) -> set[tuple[int, bytes]]:
    """The keys whose newest stored state is not an absence, in either layout."""
    return set(await latest_records(storage))


LAYOUTS = pytest.mark.parametrize("layout", ["segments", "keys"])


# -- deletions while no bridge listened ------------------------------------------------------


@LAYOUTS
async def test_index_key_deleted_while_the_bridge_is_stopped_is_removed_after_restart(
    redis_server: RedisServer, layout: str
) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        c.mset({"kept": "1", "deleted": "2", "expiring": "3"})
        await backed_up(redis_server, storage, layout)
        assert set(indexed(c)) == {b"kept", b"deleted", b"expiring"}
        # Nobody listens: no event is ever published to a bridge for these.
        c.delete("deleted")
        c.pexpire("expiring", 1)
        await anyio.sleep(0.05)
        await backed_up(redis_server, storage, layout)
        assert set(indexed(c)) == {b"kept"}
    assert await live(storage) == {(0, b"kept")}
    if layout == "keys":
        assert set(storage.objects) == {latest_name("", 0, b"kept")}


@LAYOUTS
async def test_index_flushdb_while_the_bridge_is_down_removes_every_object_after_restart(
    redis_factory: Factory, layout: str
) -> None:
    source, stream = redis_factory(), redis_factory()
    storage = MemoryStorage()
    options: dict[str, Any] = {"stream_url": stream.url(), "all_dbs": True}
    with source.client(0) as c0, source.client(3) as c3, stream.client() as s:
        c0.mset({f"zero:{i}": i for i in range(20)})
        c3.mset({f"three:{i}": i for i in range(30)})
        await backed_up(source, storage, layout, **options)
        assert len(await live(storage)) == 50 and len(indexed(s, 3)) == 30
        c3.flushdb()  # db 3 now holds no keys at all: only its index still names them
        await backed_up(source, storage, layout, **options)
        assert not s.exists(OWN.index(3))
        assert len(indexed(s, 0)) == 20
    assert {db for db, _ in await live(storage)} == {0}
    assert len(await live(storage)) == 20
    if layout == "keys":
        assert len(storage.objects) == 20


@LAYOUTS
async def test_index_swapdb_while_the_bridge_is_down_moves_the_objects_after_restart(
    redis_factory: Factory, layout: str
) -> None:
    source, stream = redis_factory(), redis_factory()
    storage = MemoryStorage()
    options: dict[str, Any] = {"stream_url": stream.url(), "all_dbs": True}
    with source.client(3) as c3, stream.client() as s:
        c3.mset({f"three:{i}": i for i in range(30)})
        await backed_up(source, storage, layout, **options)
        c3.swapdb(3, 4)
        await backed_up(source, storage, layout, **options)
        assert not s.exists(OWN.index(3)) and len(indexed(s, 4)) == 30
    assert {db for db, _ in await live(storage)} == {4}
    assert len(await live(storage)) == 30


# -- unchanged keys ---------------------------------------------------------------------------


@LAYOUTS
async def test_index_rescan_of_an_unchanged_dataset_puts_only_the_changed_key(
    redis_server: RedisServer, layout: str
) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        c.mset({f"k:{i}": i for i in range(300)})
        c.hset("h", mapping={"a": "1"})
        c.set("ttl", "v", px=3_600_000)
        await backed_up(redis_server, storage, layout)
        first = storage.puts
        assert first == 302 if layout == "keys" else first <= 5
        c.set("k:7", "changed")
        async with running_pipeline(redis_server.url(), storage, upload={"layout": layout}) as [
            uploader
        ]:
            await wait_drained(redis_server.url())
        dump = c.dump("k:7")
    assert storage.puts == first + 1  # one object, or one segment of one record
    assert uploader.puts == 1 and uploader.unchanged == 301
    rec = latest(storage, b"k:7")
    assert rec is not None and rec.payload == dump


async def test_index_unknown_marker_makes_the_next_entry_write_again(
    redis_server: RedisServer,
) -> None:
    inner = MemoryStorage()
    storage = FaultyStorage(inner)
    u = Uploader(config(redis_server), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with running(u):
            await until(lambda: drained(c))
            stored = indexed(c)[b"k"]
            assert len(stored) == 16
            note(c, "k", ev="scan")
            await until(lambda: drained(c))
            assert inner.puts == 1 and u.unchanged == 1
            # The state of a crash between the storage call and the index update.
            c.hset(OWN.index(0), "k", UNKNOWN)
            note(c, "k", ev="scan")
            await until(lambda: drained(c))
            assert inner.puts == 2 and indexed(c)[b"k"] == stored
            # While a write is in flight the index claims nothing.
            storage.hang("put")
            c.set("k", "v2")
            note(c, "k")
            await storage.wait_hanging("put")
            assert indexed(c)[b"k"] == UNKNOWN
            storage.release("put")
            await until(lambda: drained(c))
            assert indexed(c)[b"k"] not in (stored, UNKNOWN)
            # Nor while a deletion is.
            storage.hang("delete")
            c.delete("k")
            note(c, "k", ev="del")
            await storage.wait_hanging("delete")
            assert indexed(c)[b"k"] == UNKNOWN
            storage.release("delete")
            await until(lambda: drained(c))
        assert indexed(c) == {}
    assert inner.puts == 3 and inner.objects == {}


async def test_index_never_excuses_the_write_of_a_claimed_entry(
    redis_server: RedisServer,
) -> None:
    # The dead consumer may have died after a stale write landed, before its redo.
    storage = MemoryStorage()
    with redis_server.client() as c:
        create_group(c)
        c.set("k", "v")
        stored = digest(_record(c, b"k"), _target(storage))
        c.hset(OWN.index(0), "k", stored)
        note(c, "k")
        c.xreadgroup(GROUP, "dead", {STREAM: ">"})
        u = Uploader(config(redis_server, claim_idle=0.3), storage)
        async with running(u):
            await until(lambda: drained(c), within=5)
        assert indexed(c)[b"k"] == stored  # the same state: only the claim forced the PUT
    assert u.claimed == 1 and u.puts == 1 and u.unchanged == 0


async def test_index_digest_names_the_storage_so_a_new_location_gets_every_key(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with redis_server.client() as c:
        c.mset({"a": "1", "b": "2"})
        for folder in ("one", "two"):
            storage = FsStorage(tmp_path / folder)
            try:
                u = Uploader(config(redis_server), storage)
                note(c, "a", "b", ev="scan")
                async with running(u):
                    await until(lambda: drained(c))
            finally:
                await storage.close()
            assert u.puts == 2 and u.unchanged == 0


async def test_index_never_lists_own_keys(redis_server: RedisServer) -> None:
    storage = MemoryStorage()
    with redis_server.client() as c:
        c.set("rrb:something", "x")
        c.set("real", "y")
        note(c, "rrb:something", "real")
        async with running(Uploader(config(redis_server), storage)):
            await until(lambda: drained(c))
        # The bridge's rescan meets the stream, leases, done markers and the index itself.
        await backed_up(redis_server, storage)
        assert list(indexed(c)) == [b"real"]


async def test_index_versioning_tombstone_removes_the_field_and_rescans_add_no_versions(
    redis_server: RedisServer,
) -> None:
    storage = MemoryStorage()
    u = Uploader(config(redis_server, versioning=True), storage)
    with redis_server.client() as c:
        c.set("k", "v")
        note(c, "k")
        async with running(u):
            await until(lambda: drained(c))
            assert set(indexed(c)) == {b"k"}
            for _ in range(3):
                note(c, "k", ev="scan")
                await until(lambda: drained(c))
            assert len(storage.objects) == 1 and u.unchanged == 3
            c.delete("k")
            note(c, "k", ev="del")
            await until(lambda: drained(c))
        assert indexed(c) == {}
    names = sorted(storage.objects)
    assert len(names) == 2 and names[1].endswith(".tombstone")


# -- the walk over the index ------------------------------------------------------------------

NAMES = [
    b"key",
    b"kay",
    b"k*y",
    b"kx",
    b"kbz",
    b"]",
    b"k\xffy",
    b"k\x00y",
    b"other",
    b"keep:1",
    b"keep:2:x",
]


@pytest.mark.parametrize(
    "pattern",
    ["*", "k?y", "k[a-c]*", "k[^a]y", "k\\*y", "[]]", "k[\\]]*", "keep:*", "*:x", "k[c-a]*"],
)
async def test_index_walk_matches_the_pattern_exactly_as_scan_does(
    redis_server: RedisServer, pattern: str
) -> None:
    # The same names as live keys in db 1 (for SCAN) and as gone keys in db 0's index.
    with redis_server.client(1) as c1, redis_server.client(0) as c0:
        c1.mset(dict.fromkeys(NAMES, b"v"))
        c0.hset(OWN.index(0), mapping=dict.fromkeys([*NAMES, b"rrb:own"], b"d"))
        scanned = set(c1.scan_iter(match=pattern, count=2))
    stream, source = Redis.from_url(redis_server.url(0)), Redis.from_url(redis_server.url(0))
    try:
        found: list[bytes] = []
        cursor = 0
        while True:
            cursor, absent = await absent_page(
                stream, partial(exist_on, source), OWN, 0, cursor, pattern=pattern, count=2
            )
            found += absent
            if cursor == 0:
                break
    finally:
        await stream.aclose()
        await source.aclose()
    assert set(found) == scanned
    assert pattern != "*" or set(found) == set(NAMES)


async def test_index_walk_leaves_out_keys_that_exist(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.set("here", "v")
        c.hset(OWN.index(0), mapping={"here": "d", "gone": "d"})
    r = Redis.from_url(redis_server.url())
    try:
        walked = await absent_page(r, partial(exist_on, r), OWN, 0, 0, pattern="*", count=10)
        assert walked == (0, [b"gone"])
    finally:
        await r.aclose()


# -- helpers ----------------------------------------------------------------------------------


def _record(c: redis.Redis, key: bytes) -> codec.KeyRecord:
    dump = c.dump(key)
    assert isinstance(dump, bytes)
    return codec.KeyRecord(key, 0, "string", None, int(time.time() * 1e6), "", "7", dump)


def _target(storage: MemoryStorage) -> bytes:
    return storage_target(storage.description, "", versioning=False)


def test_index_digest_covers_type_expiry_payload_and_target() -> None:
    base = codec.KeyRecord(b"k", 0, "string", None, 1, "1-0", "7.0.15", b"payload")
    target = storage_target("memory://", "", versioning=False)
    same = codec.KeyRecord(b"k", 0, "string", None, 2, "9-9", "7.2.0", b"payload")
    assert digest(base, target) == digest(same, target)  # read time, entry, version: no
    assert len(digest(base, target)) == 16
    others = [
        codec.KeyRecord(b"k", 0, "list", None, 1, "1-0", "7.0.15", b"payload"),
        codec.KeyRecord(b"k", 0, "string", 5, 1, "1-0", "7.0.15", b"payload"),
        codec.KeyRecord(b"k", 0, "string", None, 1, "1-0", "7.0.15", b"payloaD"),
    ]
    assert len({digest(r, target) for r in [base, *others]}) == 4
    for moved in (
        storage_target("memory://", "p/", versioning=False),
        storage_target("file:///x", "", versioning=False),
        storage_target("memory://", "", versioning=True),
        storage_target("memory://", "", versioning=False, layout="segments"),
    ):
        assert digest(base, moved) != digest(base, target)
