"""The commands given a Redis Cluster node's URL: bad input in one line naming what is wrong,
and rrb-status finding the change stream in the cluster's own slot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rrb_streams.cli.backup import bridge, rrb
from rrb_streams.cli.status import status
from rrb_streams.wire.cluster import SLOTS, slot_of
from rrb_streams.wire.entries import entry_fields
from tests.support.cluster import Cluster, ClusterNode
from tests.support.cluster_backup import OWN


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_unassigned_slots_are_named_in_one_line(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_ok()
    owner = cluster.owner(100)
    cluster.unassign(range(100, 200))
    try:
        code = bridge([cluster.url(), "--quiet"])
    finally:
        cluster.assign(range(100, 200), owner)
        cluster.wait_ok()
    assert code == 2
    line = one_error_line(capsys)
    assert f"100 of {SLOTS} slots unassigned (100-199)" in line


def test_a_cluster_url_with_another_db_is_bad_input(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = rrb([cluster.live()[0].url(db=3), "--storage", str(tmp_path / "b"), "--quiet"])
    assert code == 2
    assert "only db 0" in one_error_line(capsys)


@pytest.fixture
def config_refused_on_one_replica(cluster: Cluster) -> Iterator[tuple[str, ClusterNode]]:
    """A user allowed everything on every node, but ``CONFIG`` on one replica."""
    cluster.wait_ok()
    refusing = cluster.replicas()[0]
    for node in cluster.live():
        rules = ["on", ">pw", "~*", "&*", "+@all"] + (["-config"] if node is refusing else [])
        node.client().execute_command("ACL", "SETUSER", "rrbtest", "reset", *rules)
    master = cluster.masters()[0]
    try:
        yield f"redis://rrbtest:pw@127.0.0.1:{master.port}/0", refusing
    finally:
        for node in cluster.live():
            node.client().execute_command("ACL", "DELUSER", "rrbtest")


def test_config_refused_on_one_node_names_that_node_and_the_setting(
    config_refused_on_one_replica: tuple[str, ClusterNode], capsys: pytest.CaptureFixture[str]
) -> None:
    url, refusing = config_refused_on_one_replica
    assert bridge([url, "--quiet"]) == 1
    line = one_error_line(capsys)
    assert f"cluster node 127.0.0.1:{refusing.port}" in line
    assert "notify-keyspace-events" in line
    assert "pw" not in line.replace("password", "")  # no secret in the message


def test_status_finds_the_stream_in_the_clusters_own_slot(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_ok()
    c = cluster.client()
    c.delete(OWN.stream)
    c.xadd(OWN.stream, entry_fields(0, b"k", "set", 0))  # type: ignore[arg-type]
    c.xgroup_create(OWN.stream, "rrb-upload", id="0")
    capsys.readouterr()
    # Asked of a node that does not own the slot: the command finds the one that does.
    owner = cluster.owner(slot_of(OWN.stream.encode()))
    elsewhere = next(n for n in cluster.masters() if n.port != owner.port)
    assert status([elsewhere.url(), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stream"] == OWN.stream
    assert shown["length"] == 1
