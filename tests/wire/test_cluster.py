"""The cluster's shape from CLUSTER SHARDS / CLUSTER SLOTS replies, and node URLs."""

from __future__ import annotations

import pytest

from rrb_streams.errors import ConfigError
from rrb_streams.wire.cluster import (
    SLOTS,
    Node,
    Shard,
    Topology,
    _from_shards,
    _from_slots,
    node_url,
    slot_of,
)
from rrb_streams.wire.keys import OwnKeys


def shards_reply() -> list[object]:
    def node(nid: bytes, port: int, role: bytes, health: bytes = b"online") -> list[object]:
        return [
            b"id", nid, b"port", port, b"ip", b"10.0.0.1", b"endpoint", b"10.0.0.1",
            b"hostname", b"", b"role", role, b"replication-offset", 1, b"health", health,
        ]  # fmt: skip

    first = [node(b"a", 7000, b"master"), node(b"d", 7003, b"replica")]
    return [
        [b"slots", [0, 5460], b"nodes", first],
        [b"slots", [5461, 10922], b"nodes", [node(b"b", 7001, b"master")]],
        [b"slots", [10923, 16000, 16001, 16383], b"nodes", [node(b"c", 7002, b"master")]],
        [b"slots", [], b"nodes", [node(b"e", 7004, b"master")]],  # a new, empty master
    ]  # fmt: skip


def test_shards_give_every_slot_its_master_and_the_replicas() -> None:
    topology = Topology(_from_shards(shards_reply(), "redis://10.0.0.1:7000"))
    assert [str(m) for m in topology.masters] == ["10.0.0.1:7000", "10.0.0.1:7001", "10.0.0.1:7002"]
    assert topology.owner(0) == topology.owner(5460) == Node("a", "10.0.0.1", 7000, True)
    assert topology.owner(16383) is not None and topology.owner(16383).id == "c"
    assert topology.shards[0].replicas == (Node("d", "10.0.0.1", 7003, False),)
    assert topology.slots_of(("10.0.0.1", 7002)) == [(10923, 16000), (16001, 16383)]
    assert topology.unassigned() == []
    topology.check_complete("redis://10.0.0.1:7000")


def test_cluster_slots_of_an_older_node_give_the_same_shape() -> None:
    reply = [
        [0, 100, [b"10.0.0.1", 7000, b"a"], [b"10.0.0.1", 7003, b"d"]],
        [101, SLOTS - 1, [b"10.0.0.1", 7001, b"b"]],
    ]
    topology = Topology(_from_slots(reply, "redis://10.0.0.1:7000"))
    assert [m.id for m in topology.masters] == ["a", "b"]
    assert topology.shards[0].replicas[0].port == 7003
    assert topology.unassigned() == []


def test_unassigned_slots_are_bad_input_named_in_one_line() -> None:
    master = Node("a", "h", 1, True)
    topology = Topology([Shard(master, ((0, 99), (200, SLOTS - 2)))])
    assert topology.unassigned() == [(100, 199), (SLOTS - 1, SLOTS - 1)]
    with pytest.raises(ConfigError) as err:
        topology.check_complete("redis://h:1/0")
    text = str(err.value)
    assert "101 of 16384 slots unassigned (100-199, 16383)" in text
    assert "\n" not in text


def test_node_urls_keep_the_scheme_and_credentials_and_use_db_0() -> None:
    assert node_url("rediss://user:pw@seed:6379/0", "10.0.0.2", 7001) == (
        "rediss://user:pw@10.0.0.2:7001/0"
    )
    assert node_url("redis://seed:6379", "::1", 7001) == "redis://[::1]:7001/0"


def test_slots_follow_hash_tags() -> None:
    assert slot_of(b"{user1000}.following") == slot_of(b"{user1000}.followers")
    assert slot_of(b"foo") == 12182  # the example of the cluster specification
    assert 0 <= slot_of(b"\x00\xff") < SLOTS


def test_own_keys_in_a_cluster_share_one_slot_and_keep_the_prefix() -> None:
    own = OwnKeys("rrb:", cluster=True)
    names = [
        own.stream, own.dead, own.stamp, own.leader, own.index(0),
        own.lease(0, "ab"), own.done(0, "ab"), own.name("compact:lease"),
    ]  # fmt: skip
    assert {slot_of(n.encode()) for n in names} == {slot_of(own.slot_tag)}
    assert all(own.is_own(n.encode()) for n in names)
    assert own.stream == "rrb:{rrb:}changes"
    assert OwnKeys("rrb:").stream == "rrb:changes"  # a single Redis keeps its names
    with pytest.raises(ValueError, match="no braces"):
        OwnKeys("a{b}:", cluster=True)
