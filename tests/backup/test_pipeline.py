"""End to end: bridge + uploaders against real Redis, to a folder and to S3 over HTTP."""

from __future__ import annotations

import pytest

from rrb_streams.storage.base import Storage
from tests.support.dataset import restore_latest, snapshot
from tests.support.moto import moto_storage
from tests.support.pipeline import running_pipeline, wait_drained
from tests.support.servers import RedisServer

LONG_KEY = b"long:" + b"k" * 10_000
BINARY_KEY = b"bin:\x00\xff\r\n\x80key"


def populate_before(c: object) -> None:
    """Keys that exist before the bridge starts: only the startup rescan can find them."""
    import redis

    assert isinstance(c, redis.Redis)
    c.set("pre:string", "before")
    c.hset("pre:hash", mapping={"a": "1", "b": "2"})
    c.rpush("pre:list", "x", "y")
    c.set("pre:ttl", "expiring", px=600_000)


def mutate(c: object) -> None:
    """Every core type, with and without TTL, and every kind of change."""
    import redis

    assert isinstance(c, redis.Redis)
    c.set("s:plain", "v1")
    c.set("s:plain", "v2")
    c.append("s:plain", "-appended")
    c.set("s:ttl", "t", ex=3600)
    c.set("s:empty", b"")
    c.set("s:gone", "x")
    c.delete("s:gone")
    c.set("s:persisted", "p", ex=3600)
    c.persist("s:persisted")
    c.set("s:expire-later", "e")
    c.pexpire("s:expire-later", 900_000)
    c.set("s:old-name", "moved")
    c.rename("s:old-name", "s:new-name")
    c.hset("h:1", mapping={"f1": "1", "f2": b"\x00\x01"})
    c.hdel("h:1", "f1")
    c.expire("h:1", 7200)
    c.rpush("l:1", *[str(i) for i in range(100)])
    c.lpop("l:1")
    c.sadd("set:1", "a", "b", "c")
    c.srem("set:1", "b")
    c.zadd("z:1", {"a": 1.5, "b": -2.0, "c": 1e10})
    c.zincrby("z:1", 3, "a")
    c.xadd("x:1", {"f": "v"})
    c.xadd("x:1", {"f": "w"})
    c.set(BINARY_KEY, b"\x00\x01\x02")
    c.set(LONG_KEY, "long")
    c.set(b"a", b"1")  # a 1-byte key
    c.set("pre:string", "after")  # a key that existed before the bridge, changed
    c.delete("pre:list")  # one deleted


async def round_trip(redis_factory: object, storage: Storage) -> None:
    assert callable(redis_factory)
    source: RedisServer = redis_factory()
    target: RedisServer = redis_factory()
    with source.client() as c:
        populate_before(c)
    async with running_pipeline(source.url(), storage, uploaders=2):
        with source.client() as c:
            mutate(c)
        await wait_drained(source.url())
    with target.client() as t:
        await restore_latest(storage, t)
        with source.client() as c:
            expected = snapshot(c)
            assert len(expected) == 17
            assert snapshot(t) == expected


@pytest.mark.anyio
async def test_pipeline_round_trip_to_a_folder(redis_factory: object, storage: Storage) -> None:
    await round_trip(redis_factory, storage)


@pytest.mark.anyio
async def test_pipeline_round_trip_to_s3(
    redis_factory: object, s3_bucket: str, moto_endpoint: str
) -> None:
    storage = moto_storage(s3_bucket, moto_endpoint, base="backups/")
    try:
        await round_trip(redis_factory, storage)
    finally:
        await storage.close()


@pytest.mark.anyio
async def test_pipeline_carries_a_50_mb_value_to_s3(
    redis_factory: object, s3_bucket: str, moto_endpoint: str
) -> None:
    assert callable(redis_factory)
    source: RedisServer = redis_factory()
    target: RedisServer = redis_factory()
    storage = moto_storage(s3_bucket, moto_endpoint)
    big = bytes(range(256)) * (50 * 1024 * 1024 // 256)
    try:
        async with running_pipeline(source.url(), storage):
            with source.client() as c:
                c.set(b"big", big)
                c.set(b"empty", b"")
            await wait_drained(source.url(), within=60)
        with target.client() as t:
            assert await restore_latest(storage, t) == 2
            assert t.get(b"big") == big
            assert t.get(b"empty") == b""
    finally:
        await storage.close()
