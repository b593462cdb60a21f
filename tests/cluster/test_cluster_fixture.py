"""The ``cluster`` fixture does what the cluster tests rely on: keys land where CLUSTER SHARDS
says, and failover, kill -9, reshard under writes and a new master keep the data readable.

The cases share one cluster and run in this order; each leaves it healthy for the next.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio.cluster

from tests.support.cluster import Cluster, ClusterNode


@pytest.fixture(autouse=True)
def _healthy_and_empty(cluster: Cluster) -> Iterator[None]:
    cluster.flush()
    yield
    assert cluster.problem() is None


def _data(n: int, prefix: str = "k") -> dict[bytes, bytes]:
    return {f"{prefix}:{i}".encode(): f"value {i}".encode() for i in range(n)}


def _write(cluster: Cluster, data: dict[bytes, bytes]) -> None:
    with cluster.client() as c:
        pipe = c.pipeline()
        for key, value in data.items():
            pipe.set(key, value)
        pipe.execute()


def _assert_readable(cluster: Cluster, data: dict[bytes, bytes]) -> None:
    """Through a fresh cluster client: it learns the topology as it is now."""
    with cluster.client() as c:
        pipe = c.pipeline()
        for key in data:
            pipe.get(key)
        assert dict(zip(data, pipe.execute(), strict=True)) == data


def _master_of(cluster: Cluster, replica: ClusterNode) -> ClusterNode:
    port = replica.replication()["master_port"]
    return next(n for n in cluster.nodes if n.port == port)


def _owners(cluster: Cluster) -> dict[int, ClusterNode]:
    """Each slot's master, from CLUSTER SLOTS."""
    by_id = {n.node_id(): n for n in cluster.nodes}
    view = cluster.live()[0].slot_view()
    return {slot: by_id[owner] for a, b, owner in view for slot in range(a, b + 1)}


def _as_dict(reply: Any) -> dict[bytes, Any]:
    """A CLUSTER SHARDS map, whether redis-py parsed it or left RESP2's flat list."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


def test_keys_land_on_the_masters_that_own_their_slots(cluster: Cluster) -> None:
    data = _data(300)
    _write(cluster, data)
    by_id = {n.node_id(): n for n in cluster.nodes}
    owner_of_slot: dict[int, ClusterNode] = {}
    with cluster.nodes[0].client() as c:
        for shard in map(_as_dict, c.execute_command("CLUSTER", "SHARDS")):
            nodes = map(_as_dict, shard[b"nodes"])
            (master,) = [n for n in nodes if n[b"role"] == b"master"]
            ranges = shard[b"slots"]
            for first, last in zip(ranges[::2], ranges[1::2], strict=True):
                owner_of_slot.update(
                    dict.fromkeys(range(first, last + 1), by_id[master[b"id"].decode()])
                )
        slots = {key: c.execute_command("CLUSTER", "KEYSLOT", key) for key in data}
    assert len(owner_of_slot) == 16384
    masters = cluster.masters()
    assert set(owner_of_slot.values()) == set(masters)
    for key, value in data.items():
        owner = owner_of_slot[slots[key]]
        with owner.client() as c:  # a plain client: a MOVED error if it did not own the key
            assert c.get(key) == value
    assert sum(int(m.command("DBSIZE")) for m in masters) == len(data)


@pytest.mark.anyio
async def test_the_url_serves_an_async_cluster_client(cluster: Cluster) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url())
    try:
        await client.set(b"async", b"yes")
        assert await client.get(b"async") == b"yes"
    finally:
        await client.aclose()


def test_unassigned_slots_fail_the_cluster_until_assigned_back(cluster: Cluster) -> None:
    owner = cluster.owner(0)
    cluster.unassign([0, 1, 2])
    assert "cluster_state fail" in str(cluster.problem())
    cluster.assign([0, 1, 2], owner)
    assert cluster.owner(0) is owner


def test_manual_failover_swaps_roles_and_keeps_the_data(cluster: Cluster) -> None:
    data = _data(200)
    _write(cluster, data)
    replica = cluster.replicas()[0]
    master = _master_of(cluster, replica)
    cluster.failover(replica)
    assert replica.is_master() and not master.is_master()
    assert cluster.replicas_of(replica) == [master]
    _assert_readable(cluster, data)


def test_reshard_moves_slots_and_keys_while_a_writer_writes(cluster: Cluster) -> None:
    source, target = cluster.masters()[:2]
    source_slots, target_slots = cluster.slots_of(source), cluster.slots_of(target)
    data = _data(3000)  # about 18 of them in the 100 slots moved
    _write(cluster, data)
    owners_before = _owners(cluster)
    written: dict[bytes, bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with cluster.client() as c:
                i = 0
                while not stop.is_set():
                    key, value = f"w:{i}".encode(), f"written {i}".encode()
                    c.set(key, value)
                    written[key] = value
                    i += 1
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        cluster.reshard(source, target, 100)
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    assert len(written) > 100
    assert (cluster.slots_of(source), cluster.slots_of(target)) == (
        source_slots - 100,
        target_slots + 100,
    )
    owners_after = _owners(cluster)
    with cluster.nodes[0].client() as c:
        slots = {key: c.execute_command("CLUSTER", "KEYSLOT", key) for key in data}
    moved = [k for k, slot in slots.items() if owners_before[slot] is not owners_after[slot]]
    assert moved and all(owners_after[slots[k]] is target for k in moved)
    with target.client() as c:
        assert [c.get(k) for k in moved] == [data[k] for k in moved]
    _assert_readable(cluster, data | written)


def test_kill_master_promotes_its_replica(cluster: Cluster) -> None:
    data = _data(200)
    _write(cluster, data)
    cluster.wait_synced()  # the replica has every key: kill -9 loses none
    master = cluster.masters()[0]
    (replica,) = cluster.replicas_of(master)
    killed = cluster.kill_master(master)
    assert killed is master and not master.alive
    assert replica.is_master()
    _assert_readable(cluster, data)
    cluster.restart(killed)
    assert cluster.replicas_of(replica) == [killed]
    _assert_readable(cluster, data)


def test_add_master_gets_a_share_of_the_slots(cluster: Cluster) -> None:
    data = _data(500)
    _write(cluster, data)
    new = cluster.add_master()
    assert new in cluster.masters()
    assert cluster.slots_of(new) >= 16384 // len(cluster.masters()) - 2
    with new.client() as c:
        assert c.dbsize() > 0
    _assert_readable(cluster, data)
