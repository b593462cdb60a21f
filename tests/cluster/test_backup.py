"""A Redis Cluster backed up by the bridge and the uploaders, restored exactly: every type,
TTLs and deletes, and under a writer through failovers of its masters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.upload import Uploader
from rrb_streams.config import VerifyConfig
from rrb_streams.verify.verifier import Verifier
from rrb_streams.wire.cluster import slot_of
from tests.support.cluster import Cluster, ClusterNode
from tests.support.cluster_backup import (
    OWN,
    Writer,
    bridge_config,
    cluster_snapshot,
    upload_config,
    wait_drained,
    write_every_type,
)
from tests.support.dataset import difference, snapshot
from tests.support.pipeline import running
from tests.support.pipeline import wait_drained as wait_stream_drained
from tests.support.restoring import fs_spec, opened, restore, restore_config
from tests.support.servers import RedisServer
from tests.support.wait import until, wait_log

pytestmark = pytest.mark.anyio

OWN_SLOT = slot_of(OWN.slot_tag)


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
            await wait_drained(cluster)
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


async def under_writes(
    cluster: Cluster,
    tmp_path: Path,
    target: RedisServer,
    *acts: Callable[[], object],
    bridge_url: str | None = None,
    keys: int = 500,
    deletes: float = 0.05,
) -> Writer:
    """Back up the cluster while a writer writes and each of ``acts`` (blocking cluster
    operations, run in a thread so the pipeline keeps going) happens in turn; then restore
    and compare. Returns the writer, for its counts."""
    cluster.wait_ok()
    cluster.flush()
    async with opened(fs_spec(tmp_path / "b")) as storage:
        overrides = {} if bridge_url is None else {"source_url": bridge_url}
        bridge = Bridge(bridge_config(cluster, **overrides))
        uploaders = [Uploader(upload_config(cluster, f"c{i}"), storage) for i in range(2)]
        async with running(bridge, *uploaders, within=300):
            with Writer(cluster, keys=keys, deletes=deletes).running() as writer:
                for act in [*acts, None]:
                    more = writer.writes + 1500
                    await until(lambda more=more: writer.writes > more, within=60)  # type: ignore[misc]
                    if act is not None:
                        await anyio.to_thread.run_sync(act)
            await anyio.to_thread.run_sync(cluster.wait_ok)
            await wait_drained(cluster, within=90)
    print(f"writes={writer.writes} refused_meanwhile={writer.errors}")
    await restored_equals_cluster(cluster, tmp_path / "b", target)
    return writer


async def test_failovers_under_writes_lose_nothing(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    killed: list[ClusterNode] = []

    def manual() -> None:
        master = cluster.masters()[0]
        cluster.failover(cluster.replicas_of(master)[0])

    def kill9() -> None:
        killed.append(cluster.kill_master(cluster.masters()[1]))

    await under_writes(cluster, tmp_path, redis_factory(), manual, kill9)
    cluster.restart(killed[0])


async def test_resharding_1000_slots_under_writes_loses_nothing(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    def reshard() -> None:
        source, target = cluster.masters()[:2]
        cluster.reshard(source, target, 1000)

    await under_writes(cluster, tmp_path, redis_factory(), reshard)


async def test_the_node_the_bridge_was_given_killed_loses_nothing(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    cluster.wait_ok()
    given = cluster.masters()[0]
    killed: list[ClusterNode] = []
    await under_writes(
        cluster,
        tmp_path,
        redis_factory(),
        lambda: killed.append(cluster.kill_master(given)),
        bridge_url=given.url(),
    )
    cluster.restart(killed[0])


async def test_a_hot_key_written_through_a_failover_ends_on_its_last_value(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    # Reads before and after the failover come from two masters' clocks: the ordering
    # stamp taken with the key's lease, not the read time, makes the later read win.
    def fail_over_the_keys_master() -> None:
        master = cluster.owner(slot_of(b"w:0"))
        cluster.failover(cluster.replicas_of(master)[0])

    # No deletes: the key must exist at the end for the comparison to say anything.
    await under_writes(
        cluster, tmp_path, redis_factory(), fail_over_the_keys_master, keys=1, deletes=0.0
    )


async def test_the_change_stream_on_its_own_redis(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    stream = redis_factory()
    apart = {"stream_url": stream.url(), "stream_cluster": False}
    c = cluster.client()
    async with opened(fs_spec(tmp_path / "b")) as storage:
        bridge = Bridge(bridge_config(cluster, **apart))
        uploader = Uploader(upload_config(cluster, **apart), storage)
        async with running(bridge, uploader, within=120):
            write_every_type(c, tag="apart")
            await wait_stream_drained(stream.url())
    for master in cluster.masters():  # nothing of rrb's own in the cluster
        with master.client() as m:
            assert list(m.scan_iter(match="rrb:*")) == []
    await restored_equals_cluster(cluster, tmp_path / "b", redis_factory())


async def test_a_wiped_master_is_rescanned_alone_and_its_keys_become_deletions(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    c = cluster.client()
    wiped = next(m for m in cluster.masters() if m.port != cluster.owner(OWN_SLOT).port)
    async with opened(fs_spec(tmp_path / "b")) as storage:
        bridge = Bridge(bridge_config(cluster, watch_interval=0.2))
        uploader = Uploader(upload_config(cluster), storage)
        with capture_logs() as logs:
            async with running(bridge, uploader, within=120):
                write_every_type(c, tag="wipe")
                await wait_drained(cluster)
                with wiped.client() as w:
                    assert w.dbsize() > 0
                    w.flushall()  # no keyspace event: seen in commandstats
                await wait_log(logs, event="bridge.rescan_done", reasons=["source_wipe"])
                await wait_drained(cluster)
    done = next(e for e in logs if e.get("reasons") == ["source_wipe"])
    assert done["nodes"] == [f"127.0.0.1:{wiped.port}"]  # that master's keys only
    await restored_equals_cluster(cluster, tmp_path / "b", redis_factory())


async def test_two_bridges_one_leads_through_the_lease_in_the_cluster(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    c = cluster.client()
    async with opened(fs_spec(tmp_path / "b")) as storage:
        bridges = [Bridge(bridge_config(cluster, leader_lease=2.0)) for _ in range(2)]
        uploader = Uploader(upload_config(cluster), storage)
        async with running(*bridges, uploader, within=120):
            write_every_type(c, n=30, tag="lead")
            await wait_drained(cluster)
            leading = [b._leadership is not None and b._leadership.leading for b in bridges]
            assert sorted(leading) == [False, True]
            bridges[leading.index(True)].stop()  # the standby takes over within the lease
            write_every_type(c, n=30, tag="after")
            await until(lambda: bridges[leading.index(False)]._leadership.leading, within=10)  # type: ignore[union-attr]
            await wait_drained(cluster)
    await restored_equals_cluster(cluster, tmp_path / "b", redis_factory())


async def test_a_master_added_and_rebalanced_under_writes_loses_nothing(
    cluster: Cluster, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    # Last in the module: the cluster keeps its fourth master.
    added: list[ClusterNode] = []
    await under_writes(
        cluster, tmp_path, redis_factory(), lambda: added.append(cluster.add_master())
    )
    assert cluster.slots_of(added[0]) > 0
