"""Reading keys from a real Redis Cluster: each where the cluster keeps it, through a slot
migration (ASK), a failover (MOVED) and a slot client that follows its slot's master."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from redis.exceptions import RedisError

from rrb_streams.format.codec import KeyRecord
from rrb_streams.wire.cluster import slot_of
from rrb_streams.wire.cluster_source import ClusterSource
from rrb_streams.wire.slot_client import connect_slot
from rrb_streams.wire.source import KeyReadError
from tests.support.cluster import Cluster

pytestmark = pytest.mark.anyio


@pytest.fixture
async def source(cluster: Cluster) -> AsyncIterator[ClusterSource]:
    cluster.wait_ok()
    cluster.flush()
    s = ClusterSource(cluster.url())
    await s.check()
    try:
        yield s
    finally:
        await s.close()


def records(results: list[KeyRecord | KeyReadError]) -> dict[bytes, KeyRecord]:
    out = {}
    for r in results:
        assert isinstance(r, KeyRecord), r
        out[r.key] = r
    return out


async def test_every_key_is_read_on_its_master_in_one_call(
    cluster: Cluster, source: ClusterSource
) -> None:
    c = cluster.client()
    keys = [f"k{i}".encode() for i in range(300)]
    for k in keys:
        c.set(k, b"v" + k)
    c.hset(b"h", mapping={b"f": b"1"})
    c.set(b"ttl", b"t", px=600_000)
    wanted = [*keys, b"h", b"ttl", b"absent"]
    got = records(await source.read(0, wanted, ["1-0"] * len(wanted), list(range(len(wanted)))))
    assert len({slot_of(k) for k in keys}) > 200  # spread over every master
    for k in keys:
        owner = cluster.owner(slot_of(k)).client()
        assert got[k].payload == owner.dump(k) and got[k].type == "string"
    assert got[b"h"].type == "hash"
    assert got[b"ttl"].expire_at_ms is not None
    assert got[b"absent"].tombstone
    assert [got[k].stamp for k in wanted] == list(range(len(wanted)))
    assert len(source.topology.masters) == 3


async def test_a_migrating_slot_is_read_where_each_key_is(
    cluster: Cluster, source: ClusterSource
) -> None:
    c = cluster.client()
    tag = b"{mig}"
    stays, moved, nowhere = tag + b"stays", tag + b"moved", tag + b"nowhere"
    c.set(stays, b"old-home")
    c.set(moved, b"new-home")
    slot = slot_of(tag)
    origin = cluster.owner(slot)
    target = next(m for m in cluster.masters() if m.port != origin.port)
    src, dst = origin.client(), target.client()
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", origin.node_id())
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id())
    try:
        src.execute_command("MIGRATE", "127.0.0.1", target.port, moved, 0, 5000)
        got = records(await source.read(0, [stays, moved, nowhere], ["1-0"] * 3))
        assert got[stays].payload == src.dump(stays)
        assert not got[moved].tombstone  # found on the importing node, not taken as deleted
        assert got[nowhere].tombstone
    finally:
        src.execute_command("MIGRATE", "127.0.0.1", target.port, stays, 0, 5000)
        for node in cluster.masters():
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        cluster.wait_ok()
    assert c.get(moved) == b"new-home" and c.get(stays) == b"old-home"


async def test_a_failover_is_followed_by_reads_and_by_the_slot_client(
    cluster: Cluster, source: ClusterSource
) -> None:
    c = cluster.client()
    key = b"{fo}key"
    c.set(key, b"before")
    pinned = connect_slot(cluster.url(), slot_of(key))
    try:
        assert await pinned.get(key) == b"before"
        master = cluster.owner(slot_of(key))
        cluster.wait_synced()
        cluster.failover(cluster.replicas_of(master)[0])
        c = cluster.client()
        c.set(key, b"after")
        (rec,) = records(await source.read(0, [key], ["1-0"])).values()
        assert rec.payload == cluster.owner(slot_of(key)).client().dump(key)
        # The pinned client meets MOVED (or READONLY) once, then follows the new master.
        for _ in range(20):
            try:
                assert await pinned.get(key) == b"after"
                break
            except RedisError:  # the failover, as a retrying caller sees it
                await anyio.sleep(0.2)
        else:
            pytest.fail("the slot client never reached the new master")
        await pinned.set(key, b"written")
        assert c.get(key) == b"written"
    finally:
        await pinned.aclose()


async def test_keys_of_another_db_are_refused_one_by_one(source: ClusterSource) -> None:
    (err,) = await source.read(3, [b"x"], ["1-0"])
    assert isinstance(err, KeyReadError) and "only db 0" in err.reason
