"""rrb-restore in-process against real Redis servers, from a folder and from S3 over HTTP."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

import anyio
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from rrb_streams.errors import ConfigError
from rrb_streams.format import codec, layout
from rrb_streams.restore.checks import require_versions
from rrb_streams.restore.planner import CHUNK, preview
from rrb_streams.restore.report import exit_status, render_summary, summary_data
from rrb_streams.restore.run import Report, Restorer
from rrb_streams.restore.writer import rdb_version
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from tests.support.dataset import snapshot
from tests.support.pipeline import running_pipeline, wait_drained
from tests.support.restoring import (
    BINARY_KEY,
    BINARY_VALUE,
    backup_keys,
    dumped_record,
    own_keys,
    populate_every_type,
    put_latest,
    restore,
    restore_config,
    source_time_us,
)
from tests.support.servers import RedisServer
from tests.support.wait import until

Factory = Callable[..., RedisServer]


def assert_clean_run(report: Report, keys: int, *, records: bool = False) -> None:
    """The run finished, restored ``keys`` keys, and failed or skipped nothing.

    ``records``: the backup is segments, whose plan counts records (``keys`` at least)."""
    assert report.finished
    assert report.totals is not None
    t = report.totals
    counts = {name: t[name] for name in ("restored", "failed", "expired", "filtered", "existing")}
    assert counts == {"restored": keys, "failed": 0, "expired": 0, "filtered": 0, "existing": 0}
    assert t["done"] == t["planned"]
    assert t["planned"] >= keys if records else t["planned"] == keys
    assert t.failures == []
    assert report.stats.outcomes["restored"] == keys
    assert exit_status(report) == 0


def assert_no_own_keys(server: RedisServer) -> None:
    with server.client() as c:
        assert own_keys(c) == {}, "the restore left rrb keys in the target"


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_restore_round_trips_every_type_with_and_without_ttl(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """Backed up by the real pipeline, restored into a fresh Redis: identical, no rrb keys."""
    source, target = redis_factory(), redis_factory()
    async with running_pipeline(source.url(), storage, uploaders=2, upload={"path_prefix": "p/"}):
        with source.client() as c:
            populate_every_type(c)
        await wait_drained(source.url())
    with source.client() as c:
        expected = snapshot(c)
        payload_bytes = sum(len(c.dump(key)) for _, key in expected)
    kinds = {kind for kind, _, _ in expected.values()}
    assert kinds == {"string", "hash", "list", "set", "zset", "stream"}
    assert sum(1 for _, _, exp in expected.values() if exp != -1) > 20
    assert expected[(0, b"s:empty")] == ("string", b"", -1)
    assert expected[(0, BINARY_KEY)] == ("string", BINARY_VALUE, -1)

    cfg = restore_config(target.url(), spec, path_prefix="p/", concurrency=3, batch_size=20)
    report = await restore(cfg, storage)

    with target.client() as t:
        assert snapshot(t) == expected
    assert_no_own_keys(target)
    assert_clean_run(report, len(expected), records=True)
    assert report.totals is not None
    segments = [o async for o in storage.list("p/segments/")]
    assert report.totals["listed"] == len(segments) > 0
    assert report.totals["bytes"] == report.stats.bytes == payload_bytes
    assert not report.resumed


@pytest.mark.anyio
async def test_restore_of_a_finished_run_again_is_a_new_run(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """The same command after a finished run starts over; the dataset stays exact."""
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=20)
        await backup_keys(c, storage)
        expected = snapshot(c)
    cfg = restore_config(target.url(), spec)
    first = await restore(cfg, storage)
    with target.client() as t:
        t.set(b"s:plain", b"changed after the first run")
    second = await restore(cfg, storage)
    assert first.run == second.run
    assert not second.resumed
    assert_clean_run(second, len(expected))
    with target.client() as t:
        assert snapshot(t) == expected
    assert_no_own_keys(target)


# --- point in time ----------------------------------------------------------------------------

DELETED = [b"del:%d" % i for i in range(5)]
NEW = [b"new:%d" % i for i in range(6)]


def first_batch(c: redis.Redis) -> None:
    for i in range(40):
        c.set(b"s:%d" % i, b"one-%d" % i, px=900_000 if i % 4 == 0 else None)
    for key in DELETED:
        c.set(key, b"doomed", ex=3600 if key.endswith(b"0") else None)
    c.hset(b"upd:hash", mapping={b"a": b"1", b"b": b"2"})
    c.rpush(b"upd:list", b"x", b"y")
    c.sadd(b"upd:set", b"m1", b"m2")
    c.zadd(b"upd:zset", {b"a": 1.0, b"b": 2.0})
    c.xadd(b"upd:stream", {b"f": b"1"})
    c.set(b"upd:string", b"before", ex=7200)
    c.set(b"ttl:persist", b"p", ex=3600)
    c.set(b"ttl:add", b"a")
    c.set(b"ttl:change", b"c", ex=3600)
    c.set(b"retype", b"a string first")
    c.set(b"gone:early", b"x")
    c.delete(b"gone:early")


def second_batch(c: redis.Redis) -> None:
    for i in range(0, 40, 3):
        c.set(b"s:%d" % i, b"two-%d" % i)
    c.delete(*DELETED)
    c.hset(b"upd:hash", b"c", b"3")
    c.hdel(b"upd:hash", b"a")
    c.rpush(b"upd:list", b"z")
    c.lpop(b"upd:list")
    c.sadd(b"upd:set", b"m3")
    c.zincrby(b"upd:zset", 5, b"a")
    c.xadd(b"upd:stream", {b"f": b"2"})
    c.append(b"upd:string", b"-after")  # APPEND keeps the TTL
    c.persist(b"ttl:persist")
    c.expire(b"ttl:add", 900)
    c.pexpire(b"ttl:change", 1_234_567)
    c.delete(b"retype")
    c.hset(b"retype", b"now", b"a hash")
    c.set(b"gone:early", b"back")
    for i, key in enumerate(NEW):
        c.set(key, b"new", ex=600 if i % 2 else None)


@pytest.mark.anyio
async def test_restore_at_a_time_between_two_batches_is_the_state_then(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source = redis_factory()
    at_t, latest = redis_factory(), redis_factory()
    with source.client() as c:
        async with running_pipeline(
            source.url(), storage, upload={"layout": "keys", "versioning": True}
        ):
            first_batch(c)
            await wait_drained(source.url())
            state_then = snapshot(c)
            await anyio.sleep(0.05)
            t_us = source_time_us(c)
            await anyio.sleep(0.05)
            second_batch(c)
            await wait_drained(source.url())
        state_now = snapshot(c)
    assert (0, b"gone:early") not in state_then
    assert state_then[(0, b"ttl:persist")][2] != -1
    assert state_now[(0, b"ttl:persist")][2] == -1
    assert state_then[(0, b"retype")][0] == "string"
    assert state_now[(0, b"retype")][0] == "hash"
    assert all((0, k) in state_then and (0, k) not in state_now for k in DELETED)

    cfg = restore_config(at_t.url(), spec, at_us=t_us)
    await require_versions(cfg, storage)  # a versioned backup: no complaint
    plan = await preview(cfg, storage, on_foreign=pytest.fail)
    assert (plan.stats.keys, plan.stats.absent) == (len(state_then), len(NEW) + 1)
    plan = await preview(restore_config(latest.url(), spec), storage, on_foreign=pytest.fail)
    assert (plan.stats.keys, plan.stats.absent) == (len(state_now), len(DELETED))
    report = await restore(cfg, storage)
    with at_t.client() as t:
        assert snapshot(t) == state_then
    assert_no_own_keys(at_t)
    assert_clean_run(report, len(state_then))
    assert report.totals is not None
    # Keys born after T, and the one deleted before it, are left out.
    assert report.totals["absent_planned"] == len(NEW) + 1

    report = await restore(restore_config(latest.url(), spec), storage)
    with latest.client() as t:
        assert snapshot(t) == state_now
    assert_no_own_keys(latest)
    assert_clean_run(report, len(state_now))
    assert report.totals is not None
    assert report.totals["absent_planned"] == len(DELETED)
    assert summary_data(report)["run_totals"]["absent"] == len(DELETED)


@pytest.mark.anyio
async def test_at_on_a_backup_without_versions_is_refused_saying_why(
    redis_server: RedisServer, spec: StorageSpec, storage: Storage
) -> None:
    with redis_server.client() as c:
        c.set(b"k", b"v")
        await backup_keys(c, storage)
        now_us = source_time_us(c)
    cfg = restore_config(redis_server.url(), spec, at_us=now_us)
    with pytest.raises(ConfigError) as exc_info:
        await require_versions(cfg, storage)
    assert str(exc_info.value) == (
        "--at needs segments or a keys-layout backup made with --versioning, and "
        f"{spec.description} holds neither: only the latest state can be restored (drop --at)"
    )
    await require_versions(restore_config(redis_server.url(), spec), storage)


# --- damage -----------------------------------------------------------------------------------


def flip_bit(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


@pytest.mark.anyio
async def test_damaged_objects_are_named_and_the_rest_restored_exactly(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=60)
        names = await backup_keys(c, storage)
        expected = snapshot(c)
    damaged = {
        b"bulk:0007": (lambda d: d[:20], "truncated (20 bytes)"),
        b"l:large": (lambda d: d[: len(d) // 2], "checksum mismatch"),
        b"h:large": (lambda d: flip_bit(d, len(d) // 2), "checksum mismatch"),
        b"z:small:ttl": (
            lambda d: b"<html>garbage, not a backup</html>" * 3,
            "not an rrb-streams object",
        ),
    }
    for key, (damage, _) in damaged.items():
        await storage.put(names[key], damage(await storage.get(names[key])))
    await storage.flush()

    report = await restore(restore_config(target.url(), spec, batch_size=7), storage)

    assert report.finished
    assert report.totals is not None
    t = report.totals
    assert t["failed"] == len(damaged)
    assert t["restored"] == len(expected) - len(damaged)
    assert exit_status(report) == 3
    reasons = dict(t.failures)
    assert set(reasons) == {names[k] for k in damaged}
    for key, (_, why) in damaged.items():
        assert reasons[names[key]].startswith(names[key] + ": ")
        assert why in reasons[names[key]]
    with target.client() as tc:
        got = snapshot(tc)
    assert got == {k: v for k, v in expected.items() if k[1] not in damaged}
    assert_no_own_keys(target)


@pytest.mark.anyio
async def test_a_payload_from_a_newer_rdb_version_is_failed_per_key_saying_so(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        c.set(b"ok", b"fine")
        c.hset(b"newer", mapping={b"f": b"v"})
        c.set(b"bad-crc", b"value")
        names = await backup_keys(c, storage)
        newer = dumped_record(c, b"newer")
        bad_crc = dumped_record(c, b"bad-crc")
    ours = rdb_version(newer.payload)
    assert ours >= 9
    p = newer.payload
    patched = p[:-10] + (ours + 2).to_bytes(2, "little") + p[-8:]
    await put_latest(storage, replace(newer, payload=patched, redis_version="9.9.9"))
    # Same RDB version, damaged CRC64: only the target can tell, and it refuses it.
    p = bad_crc.payload
    await put_latest(storage, replace(bad_crc, payload=p[:-1] + bytes([p[-1] ^ 1])))
    with target.client() as tc:
        tc.set(b"newer", b"already here")

    report = await restore(restore_config(target.url(), spec), storage)

    assert report.totals is not None
    assert (report.totals["restored"], report.totals["failed"]) == (1, 2)
    reasons = dict(report.totals.failures)
    assert set(reasons) == {names[b"newer"], names[b"bad-crc"]}
    assert f"RDB {ours + 2}" in reasons[names[b"newer"]]
    assert f"the target reads RDB {ours} at most" in reasons[names[b"newer"]]
    assert "9.9.9" in reasons[names[b"newer"]]
    assert "newer" in reasons[names[b"newer"]]
    assert "the target refused it" in reasons[names[b"bad-crc"]]
    assert "bad-crc" in reasons[names[b"bad-crc"]]
    with target.client() as tc:
        assert tc.get(b"ok") == b"fine"
        assert tc.get(b"newer") == b"already here"
        assert tc.exists(b"bad-crc") == 0
    assert exit_status(report) == 3


# --- expiry -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_keys_whose_expiry_has_passed_are_skipped_and_never_delete_the_target_key(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target = redis_factory(), redis_factory()
    now_ms = int(time.time() * 1000)
    with source.client() as c:
        c.set(b"expired:in-target", b"old value from the backup")
        c.set(b"expired:alone", b"x")
        c.rpush(b"alive", b"a", b"b")
        c.set(b"plain", b"p")
        passed = now_ms - 5_000
        later = now_ms + 3_600_000
        for key, at in (
            (b"expired:in-target", passed),
            (b"expired:alone", now_ms - 1),
            (b"alive", later),
            (b"plain", None),
        ):
            await put_latest(storage, dumped_record(c, key, expire_at_ms=at))
    with target.client() as tc:
        tc.set(b"expired:in-target", b"the target's own value")

    report = await restore(restore_config(target.url(), spec), storage)

    assert report.totals is not None
    t = report.totals
    assert (t["restored"], t["expired"], t["failed"]) == (2, 2, 0)
    assert exit_status(report) == 0
    with target.client() as tc:
        assert tc.get(b"expired:in-target") == b"the target's own value"
        assert tc.pttl(b"expired:in-target") == -1
        assert tc.exists(b"expired:alone") == 0
        assert tc.lrange(b"alive", 0, -1) == [b"a", b"b"]
        assert int(tc.execute_command("PEXPIRETIME", b"alive")) == later
        assert tc.get(b"plain") == b"p"
        assert tc.pttl(b"plain") == -1
    assert_no_own_keys(target)


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_match_restores_only_the_keys_the_glob_matches(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        for i in range(30):
            c.set(b"user:%d" % i, b"u%d" % i, ex=3600 if i % 2 else None)
            c.hset(b"order:%d" % i, b"n", b"%d" % i)
        c.set(b"user:\xff\x00", b"binary user")
        c.set(b"users", b"no colon: not matched")
        await backup_keys(c, storage)
        everything = snapshot(c)
    wanted = {k: v for k, v in everything.items() if k[1].startswith(b"user:")}
    assert len(wanted) == 31

    report = await restore(restore_config(target.url(), spec, match="user:*"), storage)

    with target.client() as tc:
        assert snapshot(tc) == wanted
    assert report.totals is not None
    t = report.totals
    assert (t["restored"], t["filtered"], t["failed"]) == (31, 31, 0)
    assert_no_own_keys(target)

    # A character class, on another target: user:1 and user:2 and their tens.
    other = redis_factory()
    report = await restore(restore_config(other.url(), spec, match="user:[12]?"), storage)
    with other.client() as tc:
        got = snapshot(tc)
    assert {k for _, k in got} == {b"user:%d" % i for i in range(10, 30)}
    assert report.totals is not None
    assert report.totals["restored"] == 20


@pytest.mark.anyio
async def test_db_restores_one_backed_up_db_into_the_target_urls_db(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target, whole = redis_factory(), redis_factory(), redis_factory()
    async with running_pipeline(source.url(), storage, bridge={"all_dbs": True}):
        with source.client(0) as c0, source.client(1) as c1:
            for i in range(20):
                c0.set(b"zero:%d" % i, b"db0")
                c1.set(b"one:%d" % i, b"db1", ex=3600 if i % 2 else None)
            c0.set(b"both", b"from db0")
            c1.hset(b"both", b"from", b"db1")
        await wait_drained(source.url())
    with source.client() as c:
        db0, db1 = snapshot(c, 0), snapshot(c, 1)
    assert len(db0) == len(db1) == 21

    report = await restore(restore_config(target.url(5), spec, db=1), storage)

    with target.client() as tc:
        assert snapshot(tc, 5) == {(5, key): value for (_, key), value in db1.items()}
        assert snapshot(tc, 0) == {}
        assert snapshot(tc, 1) == {}
    assert_clean_run(report, len(db1), records=True)
    assert_no_own_keys(target)

    # Without --db, each key returns to the db it came from.
    report = await restore(restore_config(whole.url(), spec), storage)
    with whole.client() as tc:
        assert snapshot(tc, 0) == db0
        assert snapshot(tc, 1) == db1
    assert_clean_run(report, len(db0) + len(db1))
    assert_no_own_keys(whole)


def seed_target(t: redis.Redis) -> None:
    t.flushall()
    t.set(b"a", b"target a", ex=1000)
    t.rpush(b"b", b"target list")
    t.set(b"only-in-target", b"kept")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "restored", "existing", "failed"),
    [("replace", 4, 0, 0), ("skip", 2, 2, 0), ("fail", 2, 0, 2)],
)
async def test_if_exists_decides_what_happens_to_keys_already_in_the_target(
    redis_factory: Factory,
    spec: StorageSpec,
    storage: Storage,
    mode: str,
    restored: int,
    existing: int,
    failed: int,
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        c.set(b"a", b"backup a")
        c.hset(b"b", b"backup", b"hash")
        c.set(b"c", b"backup c", ex=3600)
        c.sadd(b"d", b"backup set")
        names = await backup_keys(c, storage)
        backup = snapshot(c)
    with target.client() as t:
        seed_target(t)
        before = snapshot(t)

    report = await restore(restore_config(target.url(), spec, if_exists=mode), storage)

    assert report.totals is not None
    tot = report.totals
    assert (tot["restored"], tot["existing"], tot["failed"]) == (restored, existing, failed)
    with target.client() as t:
        got = snapshot(t)
    assert got[(0, b"only-in-target")] == before[(0, b"only-in-target")]
    assert got[(0, b"c")] == backup[(0, b"c")]
    assert got[(0, b"d")] == backup[(0, b"d")]
    for key in (b"a", b"b"):
        assert got[(0, key)] == (backup if mode == "replace" else before)[(0, key)]
    if mode == "fail":
        assert exit_status(report) == 3
        reasons = dict(tot.failures)
        assert set(reasons) == {names[b"a"], names[b"b"]}
        assert "exists in the target (--if-exists fail)" in reasons[names[b"a"]]
    else:
        assert exit_status(report) == 0
        assert tot.failures == []
    assert_no_own_keys(target)


@pytest.mark.anyio
async def test_restore_never_writes_keys_under_rrbs_own_prefix(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """An object for a key named ``rrb:…`` (a backup made with another prefix) is filtered."""
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        c.set(b"rrb:restore:not-ours", b"x")
        c.set(b"k", b"v")
        await put_latest(storage, dumped_record(c, b"rrb:restore:not-ours"))
        await put_latest(storage, dumped_record(c, b"k"))
    report = await restore(restore_config(target.url(), spec), storage)
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["filtered"]) == (1, 1)
    with target.client() as t:
        assert snapshot(t, own_prefix=b"\x00none") == {(0, b"k"): ("string", b"v", -1)}


# --- scale and placement ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_restore_of_more_keys_than_a_plan_chunk_with_a_small_backlog(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """Two planner chunks, and a backlog bound far below the key count: still exact.

    The planner adds the second chunk only once fewer than ``max_backlog`` objects of the
    first are left unwritten.
    """
    source, target = redis_factory(), redis_factory()
    n, bound = CHUNK + 200, 150
    with source.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(n):
            if i % 5 == 0:
                pipe.hset(b"h:%d" % i, mapping={b"i": b"%d" % i})
            else:
                pipe.set(b"k:%d" % i, b"v" * (i % 50), px=900_000 if i % 7 == 0 else None)
        pipe.execute()
        await backup_keys(c, storage)
        expected = snapshot(c)
    cfg = restore_config(target.url(), spec, max_backlog=bound, batch_size=25, concurrency=4)
    restorer = Restorer(cfg, storage)
    samples: list[tuple[int, int]] = []  # (planned, done)

    async def sample_counters() -> None:
        async with AsyncRedis.from_url(target.url()) as t:
            while True:
                planned, done = await t.hmget(restorer.keys.meta, ["planned", "done"])
                samples.append((int(planned or 0), int(done or 0)))
                await anyio.sleep(0.002)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample_counters)
            await restorer.run()
            tg.cancel_scope.cancel()
    report = restorer.report
    assert report is not None
    assert any(planned == CHUNK for planned, _ in samples)
    second_chunk = [done for planned, done in samples if planned > CHUNK]
    assert second_chunk, "the run ended between two samples"
    assert min(second_chunk) > CHUNK - bound
    with target.client() as t:
        assert snapshot(t) == expected
    assert_clean_run(report, n)
    assert_no_own_keys(target)


@pytest.mark.anyio
async def test_restore_stream_on_another_redis_leaves_the_target_alone(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    source, target, streams = redis_factory(), redis_factory(), redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=10)
        await backup_keys(c, storage)
        expected = snapshot(c)
    with streams.client() as s:
        s.set(b"unrelated", b"kept")
    cfg = restore_config(target.url(), spec, stream_url=streams.url())
    report = await restore(cfg, storage)
    with target.client() as t:
        assert snapshot(t) == expected
    assert_clean_run(report, len(expected))
    assert_no_own_keys(target)
    assert_no_own_keys(streams)
    with streams.client() as s:
        assert snapshot(s) == {(0, b"unrelated"): ("string", b"kept", -1)}


@pytest.mark.anyio
async def test_a_key_with_both_a_latest_object_and_versions_restores_the_newer_read(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """A backup made partly with and partly without --versioning."""
    source, target, at_target = redis_factory(), redis_factory(), redis_factory()
    t100, t150, t200 = 1_790_000_000_100_000, 1_790_000_000_150_000, 1_790_000_000_200_000

    async def put(c: redis.Redis, key: bytes, value: bytes | None, at: int, latest: bool) -> None:
        if value is None:
            rec = codec.KeyRecord.absent(key, 0, at, "", "7.0.15")
        else:
            c.set(key, value)
            rec = dumped_record(c, key, read_at_us=at)
        if latest:
            await put_latest(storage, rec, flush=False)
        else:
            name = layout.version_name("", 0, key, at, tombstone=value is None)
            await storage.put(name, codec.encode(rec))

    with source.client() as c:
        await put(c, b"latest-older", b"L100", t100, latest=True)
        await put(c, b"latest-older", b"V200", t200, latest=False)
        await put(c, b"latest-newer", b"V100", t100, latest=False)
        await put(c, b"latest-newer", b"L200", t200, latest=True)
        await put(c, b"deleted-after", b"L100", t100, latest=True)
        await put(c, b"deleted-after", None, t200, latest=False)
        await put(c, b"deleted-before", None, t100, latest=False)
        await put(c, b"deleted-before", b"L200", t200, latest=True)
    await storage.flush()

    report = await restore(restore_config(target.url(), spec), storage)
    with target.client() as t:
        assert snapshot(t) == {
            (0, b"latest-older"): ("string", b"V200", -1),
            (0, b"latest-newer"): ("string", b"L200", -1),
            (0, b"deleted-before"): ("string", b"L200", -1),
        }
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["absent"]) == (3, 1)

    report = await restore(restore_config(at_target.url(), spec, at_us=t150), storage)
    with at_target.client() as t:
        assert snapshot(t) == {
            (0, b"latest-older"): ("string", b"L100", -1),
            (0, b"latest-newer"): ("string", b"V100", -1),
            (0, b"deleted-after"): ("string", b"L100", -1),
        }
    assert report.totals is not None
    assert report.totals["restored"] == 3
    assert report.totals["absent"] + report.totals["absent_planned"] == 1
    assert_no_own_keys(at_target)


@pytest.mark.anyio
async def test_a_stopped_restore_resumes_where_it_stopped(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """stop() half-way: exit status 1, rrb keys left for the resume, which redoes nothing."""
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(1000):
            pipe.set(b"k:%d" % i, b"%d" % i, px=900_000 if i % 3 == 0 else None)
        pipe.execute()
        await backup_keys(c, storage)
        expected = snapshot(c)
    cfg = restore_config(target.url(), spec, batch_size=5, concurrency=1)
    first = Restorer(cfg, storage)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            async with AsyncRedis.from_url(target.url()) as t:

                async def hundred_done() -> bool:
                    return int(await t.hget(first.keys.meta, "done") or 0) >= 100

                await until(hundred_done, within=30, interval=0.002)
            first.stop()
    report = first.report
    assert report is not None
    assert not report.finished
    assert exit_status(report) == 1
    done_first = report.stats.outcomes["restored"]
    assert 100 <= done_first < 1000
    with target.client() as t:
        assert own_keys(t) != {}, "the run's state must survive a stop"

    second = await restore(cfg, storage)
    assert second.resumed
    assert second.finished
    assert second.stats.outcomes["restored"] == 1000 - done_first
    totals = second.totals
    assert totals is not None
    assert totals["restored"] == totals["done"] == totals["planned"] == 1000
    with target.client() as t:
        assert snapshot(t) == expected
    assert_no_own_keys(target)


@pytest.mark.anyio
async def test_restore_of_values_over_a_megabyte(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """Objects checksummed off the event loop come back as exactly as small ones."""
    source, target = redis_factory(), redis_factory()
    rng = random.Random(7)
    with source.client() as c:
        c.set(b"big:string", rng.randbytes(3_000_000), px=900_000)
        c.hset(b"big:hash", mapping={b"f%d" % i: rng.randbytes(2_000) for i in range(800)})
        c.set(b"small", b"s")
        names = await backup_keys(c, storage)
        expected = snapshot(c)
    big = await storage.get(names[b"big:string"])
    assert len(big) > 2_000_000
    await storage.put(names[b"big:string"], flip_bit(big, 1_500_000))
    expected.pop((0, b"big:string"))
    report = await restore(restore_config(target.url(), spec, concurrency=2), storage)
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["failed"]) == (2, 1)
    assert report.totals.failures == [
        (names[b"big:string"], f"{names[b'big:string']}: checksum mismatch")
    ]
    with target.client() as t:
        assert snapshot(t) == expected


@pytest.mark.anyio
async def test_a_plan_resumed_after_a_stop_counts_each_listed_object_once(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """The summary's objects listed and foreign objects stay exact across a resume."""
    source, target = redis_factory(), redis_factory()
    n = CHUNK + 100
    with source.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(n):
            pipe.set(b"k:%d" % i, b"%d" % i)
        pipe.execute()
        await backup_keys(c, storage)
        expected = snapshot(c)
    # Names that list before every rrb object ("db…"), and are not rrb objects.
    for name in ("AAA.txt", "README.txt"):
        await storage.put(name, b"not an rrb object")
    await storage.flush()
    cfg = restore_config(target.url(), spec, max_backlog=50, batch_size=10, concurrency=1)
    first = Restorer(cfg, storage)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            async with AsyncRedis.from_url(target.url()) as t:

                async def first_chunk_begun() -> bool:
                    planned, done = await t.hmget(first.keys.meta, ["planned", "done"])
                    return int(planned or 0) == CHUNK and int(done or 0) >= 10

                await until(first_chunk_begun, within=30, interval=0.002)
            first.stop()
    assert first.report is not None
    assert not first.report.finished

    second = await restore(cfg, storage)
    assert second.resumed
    totals = second.totals
    assert totals is not None
    assert (totals["planned"], totals["restored"], totals["done"]) == (n, n, n)
    assert (totals["listed"], totals["foreign"]) == (n + 2, 2)
    assert summary_data(second)["run_totals"]["foreign_objects"] == 2
    with target.client() as t:
        assert snapshot(t) == expected
    assert_no_own_keys(target)


@pytest.mark.anyio
async def test_the_summary_names_twenty_failures_and_counts_the_rest(
    redis_server: RedisServer, spec: StorageSpec, storage: Storage
) -> None:
    with redis_server.client() as c:
        for i in range(30):
            c.set(b"k:%02d" % i, b"v")
        names = await backup_keys(c, storage)
        c.flushall()
    bad = sorted(names[b"k:%02d" % i] for i in range(25))
    for name in bad:
        await storage.put(name, b"garbage")
    report = await restore(restore_config(redis_server.url(), spec), storage)
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["failed"]) == (5, 25)
    assert [name for name, _ in report.totals.failures] == bad
    lines = render_summary(report).splitlines()
    start = lines.index("  failed: 25") + 1
    shown = lines[start : start + 20]
    assert [line.split(": ", 1)[0].strip() for line in shown] == bad[:20]
    assert all(line.endswith(": truncated (7 bytes)") for line in shown)
    assert lines[start + 20] == "    … and 5 more (see the log)"
    assert summary_data(report)["failures"] == [
        {"object": name, "reason": f"{name}: truncated (7 bytes)"} for name in bad
    ]
