"""A Redis Cluster backed up by the bridge and the uploaders, restored exactly: every type,
TTLs and deletes, and under a writer through failovers of its masters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.upload import Uploader
from rrb_streams.config import VerifyConfig
from rrb_streams.verify.verifier import Verifier
from tests.support.cluster import Cluster
from tests.support.cluster_backup import (
    Writer,
    bridge_config,
    cluster_snapshot,
    drained,
    upload_config,
    write_every_type,
)
from tests.support.dataset import difference, snapshot
from tests.support.pipeline import running
from tests.support.restoring import fs_spec, opened, restore, restore_config
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio


async def restored_equals_cluster(cluster: Cluster, spec_path: Path, target: RedisServer) -> None:
    spec = fs_spec(spec_path)
    expected = cluster_snapshot(cluster)
    async with opened(spec) as storage:
        await restore(restore_config(target.url(), spec), storage, within=60)
    with target.client() as t:
        got = snapshot(t)
    assert difference(expected, got) == ""
    assert len(got) == len(expected) > 0


async def test_a_cluster_is_backed_up_and_restored_exactly_into_a_single_redis(
    cluster: Cluster, redis_factory: object, tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    c = cluster.client()
    write_every_type(c, tag="before")  # found by the startup rescan of every master
    async with opened(fs_spec(tmp_path / "b")) as storage:
        bridge = Bridge(bridge_config(cluster))
        uploader = Uploader(upload_config(cluster), storage)
        async with running(bridge, uploader, within=120):
            write_every_type(c, tag="live")  # events of every master
            await until(lambda: drained(cluster), within=60)
    await restored_equals_cluster(cluster, tmp_path / "b", redis_factory())  # type: ignore[operator]

    # rrb-verify reads every master too, and --repair queues in the cluster's own slot.
    cfg = VerifyConfig(
        source_url=cluster.url(), source_cluster=True, stream_cluster=True, recheck_delay=0.1
    ).validate()
    async with opened(fs_spec(tmp_path / "b")) as storage:
        clean = await Verifier(cfg, storage).run()
        c.set("drift", "written while nothing backed up")
        drift = await Verifier(replace(cfg, repair=True), storage).run()
    assert clean.differences == 0 and clean.checked >= len(cluster_snapshot(cluster)) - 1
    assert (drift.missing, drift.queued, drift.examples["missing"]) == (1, 1, ["db0:drift"])


async def test_failovers_under_writes_lose_nothing(
    cluster: Cluster, redis_factory: object, tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    async with opened(fs_spec(tmp_path / "b")) as storage:
        bridge = Bridge(bridge_config(cluster))
        uploaders = [Uploader(upload_config(cluster, f"c{i}"), storage) for i in range(2)]
        async with running(bridge, *uploaders, within=240):
            with Writer(cluster).running() as writer:
                await until(lambda: writer.writes > 2000, within=30)
                master = cluster.masters()[0]
                cluster.failover(cluster.replicas_of(master)[0])  # manual
                await until(lambda: writer.writes > 4000, within=30)
                killed = cluster.kill_master(cluster.masters()[1])  # automatic, after kill -9
                await until(lambda: writer.writes > 6000, within=60)
            cluster.restart(killed)
            cluster.wait_ok()
            await until(lambda: drained(cluster), within=90)
        print(f"writes={writer.writes} refused_during_failovers={writer.errors}")
    await restored_equals_cluster(cluster, tmp_path / "b", redis_factory())  # type: ignore[operator]
