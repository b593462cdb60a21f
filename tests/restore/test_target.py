"""The target refusing writes mid-run (out of memory): the batch is retried, never counted as
failed; past --retry-timeout the process stops, and the same command finishes the run."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from redis.asyncio import Redis

from rrb_streams.config import RestoreConfig
from rrb_streams.errors import DependencyError
from rrb_streams.format import codec, layout
from rrb_streams.format.selection import Item
from rrb_streams.restore.run import Restorer
from rrb_streams.restore.state import GROUP, RunState
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from tests.support.servers import RedisServer
from tests.support.wait import until

Factory = Callable[..., RedisServer]
KEYS = 3000


async def fill_storage(source: RedisServer, storage: Storage) -> None:
    c = source.client()
    pipe = c.pipeline(transaction=False)
    for i in range(KEYS):
        pipe.set(f"key:{i}", b"x" * 100)
        pipe.dump(f"key:{i}")
    dumps = pipe.execute()[1::2]
    for i, payload in enumerate(dumps):
        key = f"key:{i}".encode()
        rec = codec.KeyRecord(key, 0, "string", None, 1, "0-1", "7.0.15", payload)
        await storage.put(layout.latest_name("", 0, key), codec.encode(rec))


@pytest.mark.anyio
async def test_out_of_memory_target_is_retried_then_the_run_resumes(
    redis_factory: Factory,
    spec: StorageSpec,
    storage: Storage,
) -> None:
    source, target, stream = redis_factory(), redis_factory(), redis_factory()
    await fill_storage(source, storage)
    cfg = RestoreConfig(
        target_url=target.url(),
        stream_url=stream.url(),
        storage=spec,
        concurrency=1,
        batch_size=20,
        retry_timeout=2.0,
        max_backoff=0.2,
        consumer="oom-test",
    ).validate()
    t = target.client()
    restorer = Restorer(cfg, storage)

    async def starve_memory() -> None:
        await until(lambda: t.dbsize() >= KEYS // 5, within=60, interval=0.005)
        t.config_set("maxmemory-policy", "noeviction")
        t.config_set("maxmemory", "1")

    with pytest.raises(BaseException) as raised:  # the task group wraps the error
        async with anyio.create_task_group() as tg:
            tg.start_soon(starve_memory)
            await restorer.run()
    error = raised.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, DependencyError), repr(raised.value)
    assert "gave up after" in str(error) and "maxmemory" in str(error)
    assert 0 < t.dbsize() < KEYS
    meta = next(iter(stream.client().scan_iter(match="rrb:restore:*:run")))
    assert int(stream.client().hget(meta, "failed") or 0) == 0, "a refused write was failed"

    t.config_set("maxmemory", "0")
    again = Restorer(cfg, storage)
    with anyio.fail_after(60):
        await again.run()
    report = again.report
    assert report is not None and report.finished and report.resumed
    assert report.totals is not None
    assert report.totals["restored"] == KEYS and report.totals["failed"] == 0
    assert t.dbsize() == KEYS
    assert {t.get(f"key:{i}") for i in range(KEYS)} == {b"x" * 100}
    assert not list(stream.client().scan_iter(match="rrb:*"))


@pytest.mark.anyio
async def test_a_run_finished_by_another_process_ends_this_one_as_finished(
    redis_factory: Factory,
    spec: StorageSpec,
    storage: Storage,
) -> None:
    target = redis_factory()
    cfg = RestoreConfig(
        target_url=target.url(),
        storage=spec,
        claim_idle=60.0,  # the other process's batch is never ours to take
        consumer="late-joiner",
    ).validate()
    restorer = Restorer(cfg, storage)
    r = Redis.from_url(target.url())
    # The other process: it planned everything and holds the last batch.
    other = RunState(r, restorer.keys, "other")
    await other.join("test")
    assert await other.take_planner(30)
    await other.add([Item("g", ("db0/aa/x.backup",), 1)], per_entry=10, cursor="g", done=True)
    await r.xreadgroup(GROUP, "other", {restorer.keys.stream: ">"}, count=1)

    async def finish_elsewhere() -> None:
        await anyio.sleep(0.5)  # this process is waiting for the batch by now
        await r.delete(*restorer.keys.all())

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_elsewhere)
            await restorer.run()
    report = restorer.report
    assert report is not None and report.finished and report.totals is None
    assert report.stats.outcomes["restored"] == 0
    assert await r.keys("rrb:*") == []
    await r.aclose()


RESTORE_ACL = (
    "on >restore-pw ~* &* +@read +@write +@stream +@hash +@scripting +@transaction "
    "+@connection -@dangerous +restore +time"
)


@pytest.mark.anyio
async def test_restore_as_an_acl_user_with_the_documented_rights(
    redis_factory: Factory,
    spec: StorageSpec,
    storage: Storage,
) -> None:
    source, target = redis_factory(), redis_factory()
    await fill_storage(source, storage)
    t = target.client()
    t.execute_command("ACL", "SETUSER", "restorer", *RESTORE_ACL.split())
    t.execute_command("ACL", "SETUSER", "no-restore", *RESTORE_ACL.split(), "-restore")
    url = f"redis://restorer:restore-pw@127.0.0.1:{target.port}/0"
    refused = RestoreConfig(
        target_url=url.replace("restorer:", "no-restore:"), storage=spec
    ).validate()
    with pytest.raises(DependencyError, match="refused a probe write") as raised:
        await Restorer(refused, storage).run()
    assert "restore-pw" not in str(raised.value)
    assert t.dbsize() == 0

    restorer = Restorer(RestoreConfig(target_url=url, storage=spec).validate(), storage)
    with anyio.fail_after(60):
        await restorer.run()
    report = restorer.report
    assert report is not None and report.totals is not None
    assert report.totals["restored"] == KEYS and report.totals["failed"] == 0
    assert t.dbsize() == KEYS
