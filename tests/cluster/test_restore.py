"""rrb-restore into a real Redis Cluster, found from any node's URL: backups of a single Redis
and of a cluster restored exactly, through a failover, a resharding and a migrating slot; a
cluster with unassigned slots refused in one line; the run's own keys in one slot."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import redis

from rrb_streams.format.codec import KeyRecord
from rrb_streams.restore.report import exit_status
from rrb_streams.restore.run import Restorer
from rrb_streams.storage.base import Storage
from rrb_streams.wire.cluster import slot_of
from rrb_streams.wire.keys import OwnKeys
from tests.support.cluster import Cluster, ClusterNode
from tests.support.cluster_backup import cluster_snapshot, write_every_type
from tests.support.dataset import Snapshot, difference, snapshot
from tests.support.faulty import FaultyStorage
from tests.support.proc import one_line
from tests.support.restoring import (
    dumped_record,
    expire_at_ms,
    fs_spec,
    opened,
    populate_every_type,
    put_latest,
    put_segment,
    restore,
    restore_config,
    run_cli,
)
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
OWN_SLOT = slot_of(OwnKeys("rrb:", cluster=True).slot_tag)
LARGE = 17 * 1024 * 1024  # above the writer's threshold for sending a value in pieces


@pytest.fixture
def target(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, healthy and empty."""
    cluster.wait_ok()
    cluster.flush()
    yield cluster


def records_of(c: redis.Redis, *, db: int = 0, stamp: int = 1000) -> list[KeyRecord]:
    """Every key of ``c``'s selected db as a record stamped ``stamp``, labelled ``db``."""
    return [
        replace(dumped_record(c, key, db=db, expire_at_ms=expire_at_ms(c, key)), stamp=stamp)
        for key in sorted(c.scan_iter(count=1000))
    ]


def deleted_later(c: redis.Redis, keys: list[bytes], *, stamp: int) -> list[KeyRecord]:
    """Tombstones of ``keys`` read after their live records (``stamp`` higher), as the
    backup records a delete; the keys are deleted from ``c`` too."""
    version = str(c.info("server")["redis_version"])
    c.delete(*keys)
    now = int(c.time()[0]) * 1_000_000
    return [replace(KeyRecord.absent(k, 0, now, "", version), stamp=stamp) for k in keys]


async def store(storage: Storage, records: list[KeyRecord], layout: str) -> None:
    if layout == "segments":
        half = len(records) // 2
        await put_segment(storage, records[:half], block_records=32)
        await put_segment(storage, records[half:], block_records=32)
    else:
        newest: dict[tuple[int, bytes], KeyRecord] = {}
        for rec in records:  # the keys layout keeps each key's latest state
            if (rec.db, rec.key) not in newest or rec.stamp > newest[rec.db, rec.key].stamp:
                newest[rec.db, rec.key] = rec
        for rec in newest.values():
            await put_latest(storage, rec, flush=False)
        await storage.flush()


def tiny_backup(redis_factory: Factory, folder: Path) -> None:
    """One key's backup in ``folder`` (keys layout), for tests that stop before writing."""
    source = redis_factory()
    with source.client() as c:
        c.set(b"k", b"v")
        records = records_of(c)

    async def backed_up() -> None:
        async with opened(fs_spec(folder)) as storage:
            await store(storage, records, "keys")

    anyio.run(backed_up)


def exact(cluster: Cluster, expected: Snapshot) -> None:
    got = cluster_snapshot(cluster)
    assert difference(expected, got) == ""
    assert len(got) == len(expected) > 0


@pytest.mark.parametrize("layout", ["segments", "keys"])
async def test_a_single_redis_backup_is_restored_exactly_into_a_cluster(
    target: Cluster, redis_factory: Factory, tmp_path: Path, layout: str
) -> None:
    source: RedisServer = redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=300)
        if layout == "segments":  # a value sent in pieces, not packed
            c.set(b"s:large", os.urandom(LARGE), px=600_000)
        records = records_of(c)
        gone = [b"bulk:%04d" % i for i in range(0, 300, 7)]
        records += deleted_later(c, gone, stamp=2000)
        expected = snapshot(c)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as storage:
        await store(storage, records, layout)
        report = await restore(restore_config(target.url(), spec, range_bytes=20_000), storage)
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["absent"]) == (len(expected), len(gone))
    assert report.totals["failed"] == 0 and exit_status(report) == 0
    exact(target, expected)
    for master in target.masters():  # the keys went to every master
        with master.client() as m:
            assert m.dbsize() > 0


async def test_a_cluster_backup_is_restored_exactly_into_the_flushed_cluster(
    target: Cluster, tmp_path: Path
) -> None:
    c = target.client()
    try:
        write_every_type(c, n=80, tag="cc")
    finally:
        c.close()
    expected = cluster_snapshot(target)
    records: list[KeyRecord] = []
    for master in target.masters():  # each key DUMPed where the cluster keeps it
        with master.client() as m:
            records += records_of(m)
    assert len(records) == len(expected)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as storage:
        await store(storage, records, "segments")
        target.flush()
        report = await restore(restore_config(target.url(), spec), storage)
    assert report.totals is not None and report.totals["failed"] == 0
    exact(target, expected)


class PausingStorage(FaultyStorage):
    """Starts hanging its reads at the ``pause_at``-th ranged read, each one of them."""

    def __init__(self, inner: Storage, *pause_at: int) -> None:
        super().__init__(inner)
        self.pause_at = set(pause_at)
        self.ranged = 0

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        self.ranged += 1
        if self.ranged in self.pause_at:
            self.hang("get")
        return await super().get_range(name, start, length)

    async def paused(self, at: int) -> None:
        """Return once the reads paused at the ``at``-th (and not at an earlier pause)."""
        await until(lambda: self.ranged >= at and self.hanging["get"] > 0)


async def test_a_failover_and_a_reshard_mid_restore_still_end_exact(
    target: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    source: RedisServer = redis_factory()
    with source.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(4000):
            pipe.set(b"k:%05d" % i, b"v%d" % i, px=600_000 if i % 5 == 0 else None)
        pipe.execute()
        records = records_of(c)
        expected = snapshot(c)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as inner:
        await store(inner, records, "segments")
        # Reads pause twice, some ranges into the restore and more ranges later on.
        storage = PausingStorage(inner, 15, 45)
        cfg = restore_config(target.url(), spec, range_bytes=3_000, concurrency=2)
        restorer = Restorer(cfg, storage)
        restored = restorer.stats.outcomes
        seen: list[int] = []
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(restorer.run)
                await storage.paused(15)
                seen.append(restored["restored"])
                # The master of the run's own keys: its state follows the failover too.
                owner = target.owner(OWN_SLOT)
                replica = target.replicas_of(owner)[0]
                await anyio.to_thread.run_sync(target.failover, replica)
                storage.release("get")
                await storage.paused(45)
                seen.append(restored["restored"])
                source_node, to = target.masters()[:2]
                await anyio.to_thread.run_sync(target.reshard, source_node, to, 200)
                storage.release("get")
    assert 0 < seen[0] < seen[1] < len(expected), seen  # both came mid-restore
    report = restorer.report
    assert report is not None and report.totals is not None
    assert report.totals["restored"] == len(expected)
    assert report.totals["failed"] == 0
    exact(target, expected)


def _setslot(nodes: list[ClusterNode], slot: int, *args: str) -> None:
    for node in nodes:
        with node.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, *args)


async def test_keys_of_a_migrating_slot_are_written_on_the_importing_node(
    target: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    source: RedisServer = redis_factory()
    with source.client() as c:
        for i in range(50):
            c.set(b"{mig}:%d" % i, b"v%d" % i)
            c.set(b"other:%d" % i, b"w%d" % i)
        c.set(b"{mig}:large", os.urandom(LARGE))  # redirected, so sent packed after ASKING
        records = records_of(c)
        expected = snapshot(c)
    slot = slot_of(b"{mig}")
    assert slot != OWN_SLOT
    old = target.owner(slot)
    new = next(m for m in target.masters() if m is not old)
    _setslot([new], slot, "IMPORTING", old.node_id())
    _setslot([old], slot, "MIGRATING", new.node_id())
    try:
        spec = fs_spec(tmp_path / "b")
        async with opened(spec) as storage:
            await store(storage, records, "segments")
            report = await restore(restore_config(target.url(), spec), storage)
        with new.client() as c:
            assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 51  # asked there
    finally:  # the migration ends: the slot is the importing node's
        others = [m for m in target.masters() if m not in (new, old)]
        _setslot([new, old, *others], slot, "NODE", new.node_id())
        target.wait_ok()
    assert report.totals is not None and report.totals["failed"] == 0
    exact(target, expected)


def test_unassigned_slots_in_the_target_are_one_line_and_exit_2(
    cluster: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    cluster.wait_ok()
    folder = tmp_path / "b"
    tiny_backup(redis_factory, folder)
    # Slots of one master, so that one ADDSLOTS gives them back.
    owner = cluster.owner(100)
    far = next(s for s in range(16383, 0, -97) if cluster.owner(s) is owner and s > 200)
    slots = [100, 101, 102, far]
    cluster.unassign(slots)
    try:
        done = run_cli(cluster.url(), "--storage", str(folder), "--retry-timeout", "5")
    finally:
        cluster.assign(slots, owner)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr, logs=True)
    assert f"4 of 16384 slots unassigned (100-102, {far})" in line, line
    cluster.wait_ok()
    with cluster.client() as c:
        assert c.exists(b"k") == 0  # nothing was written


def test_a_cluster_url_with_a_db_other_than_0_is_one_line_and_exit_2(
    cluster: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    folder = tmp_path / "b"
    tiny_backup(redis_factory, folder)
    url = cluster.live()[0].url(db=3)
    done = run_cli(url, "--db", "3", "--storage", str(folder))
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr, logs=True)
    assert "is a Redis Cluster node, and a cluster has only db 0" in line, line


async def test_the_runs_own_keys_share_one_slot_and_start_with_the_prefix(
    target: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    source: RedisServer = redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=200)
        records = records_of(c)
        expected = snapshot(c)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as storage:
        await store(storage, records, "keys")
        cfg = restore_config(target.url(), spec, own_prefix="mine:", batch_size=20, concurrency=1)
        faulty = FaultyStorage(storage)
        first = Restorer(cfg, faulty)
        faulty.hang("get")  # the writers wait with their first batches: the run is under way
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            await faulty.wait_hanging("get")
            first.stop()
            faulty.release("get")
        assert first.report is not None and not first.report.finished
        own: dict[int, list[bytes]] = {}
        for master in target.masters():
            with master.client() as c:
                keys = [k for k in c.scan_iter(count=1000) if (0, k) not in expected]
                if keys:
                    own[master.port] = keys
        assert len(own) == 1, own  # one master holds them all
        (keys,) = own.values()
        assert len(keys) >= 2 and all(k.startswith(b"mine:{mine:}restore:") for k in keys), keys
        assert {slot_of(k) for k in keys} == {slot_of(b"{mine:}")}
        # Resumed from where it stopped, in the same slot.
        report = await restore(cfg, storage)
    assert report.resumed and report.totals is not None and report.totals["failed"] == 0
    exact(target, expected)
    for master in target.masters():
        with master.client() as c:
            assert list(c.scan_iter(match=b"mine:*")) == []


async def test_a_stream_url_of_a_cluster_keeps_the_runs_keys_there_in_one_slot(
    target: Cluster, redis_factory: Factory, tmp_path: Path
) -> None:
    source: RedisServer = redis_factory()
    single: RedisServer = redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=50)
        records = records_of(c)
        expected = snapshot(c)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as storage:
        await store(storage, records, "keys")
        cfg = restore_config(single.url(), spec, stream_url=target.url(), batch_size=20)
        first = Restorer(cfg, storage)
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            first.stop()
        owner = target.owner(OWN_SLOT)
        with owner.client() as c:
            keys = list(c.scan_iter(match=b"rrb:*"))
        assert keys and all(k.startswith(b"rrb:{rrb:}restore:") for k in keys), keys
        report = await restore(cfg, storage)
    assert report.totals is not None and report.totals["failed"] == 0
    with single.client() as t:
        assert difference(expected, snapshot(t)) == ""
        assert list(t.scan_iter(match=b"rrb:*")) == []


@pytest.mark.parametrize("layout", ["segments", "keys"])
async def test_other_dbs_fail_into_a_cluster_unless_db_chooses_one(
    target: Cluster, redis_factory: Factory, tmp_path: Path, layout: str
) -> None:
    source: RedisServer = redis_factory()
    with source.client(db=0) as c:
        for i in range(40):
            c.set(b"zero:%d" % i, b"0")
        c.set(b"both", b"from db 0")
        records = records_of(c, db=0)
        zero = snapshot(c, db=0)
    with source.client(db=3) as c:
        for i in range(30):
            c.set(b"three:%d" % i, b"3")
        c.set(b"both", b"from db 3")
        records += records_of(c, db=3)
        three = snapshot(c, db=3)
    spec = fs_spec(tmp_path / "b")
    async with opened(spec) as storage:
        await store(storage, records, layout)
        report = await restore(restore_config(target.url(), spec), storage)
        assert report.totals is not None
        assert (report.totals["restored"], report.totals["failed"]) == (len(zero), len(three))
        assert exit_status(report) != 0
        reasons = [reason for _, reason in report.totals.failures]
        assert reasons and all("restore db 3 on its own with --db 3" in r for r in reasons)
        if layout == "segments":  # one named per range, the rest counted
            assert len(reasons) < len(three)
        exact(target, zero)

        target.flush()
        report = await restore(restore_config(target.url(), spec, db=3), storage)
    assert report.totals is not None and report.totals["failed"] == 0
    exact(target, {(0, key): value for (_, key), value in three.items()})
