"""FLUSHDB, FLUSHALL and SWAPDB emit no keyspace events: the bridge notices them in
``INFO commandstats`` and the backup converges through the pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from rrb_streams.errors import ObjectNotFound
from rrb_streams.storage.base import Storage
from tests.support.dataset import restore_latest, snapshot
from tests.support.pipeline import running_pipeline, wait_drained
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]


def fill(c: redis.Redis, prefix: str, n: int = 50) -> None:
    for i in range(n):
        c.set(f"{prefix}:{i}", f"v{i}")
    c.hset(f"{prefix}:hash", mapping={"a": "1"})
    c.set(f"{prefix}:ttl", "t", ex=3600)


async def stored_state(storage: Storage, factory: Factory) -> dict | None:  # type: ignore[type-arg]
    """What a restore of the latest objects gives: the backup, as a dataset; ``None`` when an
    uploader deleted a listed object meanwhile (the backup is still moving)."""
    scratch = factory()
    try:
        await restore_latest(storage, scratch.client())
    except ObjectNotFound:
        return None
    return snapshot(scratch.client())


async def converge(
    source: RedisServer, stream: RedisServer, storage: Storage, factory: Factory
) -> float:
    """Wait until the backup equals the source; the seconds it took."""
    start = time.monotonic()

    async def converged() -> bool:
        await wait_drained(stream.url(), within=30)
        return await stored_state(storage, factory) == snapshot(source.client())

    # 20 s to converge, and the drain already under way then may take its 30 s.
    await until(converged, within=50)
    return time.monotonic() - start


@pytest.mark.parametrize("wipe", ["flushdb", "flushall", "flushall-async"])
async def test_a_flush_of_the_source_reaches_the_backup(
    redis_factory: Factory, storage: Storage, wipe: str
) -> None:
    source, stream = redis_factory(), redis_factory("--appendonly", "yes")
    c = source.client()
    fill(c, "before")
    async with running_pipeline(
        source.url(),
        storage,
        stream_url=stream.url(),
    ):
        await converge(source, stream, storage, redis_factory)
        assert len(await stored_state(storage, redis_factory) or {}) == 52
        if wipe == "flushdb":
            c.flushdb()
        elif wipe == "flushall":
            c.flushall()
        else:
            c.flushall(asynchronous=True)
        c.set("after", "1")  # a change after the wipe travels as usual
        took = await converge(source, stream, storage, redis_factory)
    state = await stored_state(storage, redis_factory)
    assert state is not None and list(state) == [(0, b"after")]
    assert took < 10


async def test_swapdb_brings_the_other_dbs_keys_into_the_backup(
    redis_factory: Factory, storage: Storage
) -> None:
    source, stream = redis_factory(), redis_factory("--appendonly", "yes")
    fill(source.client(0), "zero")
    fill(source.client(1), "one", n=10)
    async with running_pipeline(
        source.url(),
        storage,
        stream_url=stream.url(),
    ):
        await converge(source, stream, storage, redis_factory)
        source.client().swapdb(0, 1)
        await converge(source, stream, storage, redis_factory)
    state = await stored_state(storage, redis_factory)
    assert state is not None
    assert {k for _, k in state} == {b"one:%d" % i for i in range(10)} | {b"one:hash", b"one:ttl"}


async def test_a_wipe_of_the_streams_own_redis_is_made_good(
    redis_factory: Factory, storage: Storage
) -> None:
    source, stream = redis_factory(), redis_factory("--appendonly", "yes")
    c = source.client()
    fill(c, "k")
    async with running_pipeline(
        source.url(),
        storage,
        stream_url=stream.url(),
    ):
        await converge(source, stream, storage, redis_factory)
        c.set("k:0", "changed")
        c.delete("k:1")
        pipe = c.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"burst:{i}", i)
        pipe.execute()
        # The change stream, its group, the entries not yet uploaded and the index are gone.
        stream.client().flushall()
        await converge(source, stream, storage, redis_factory)
