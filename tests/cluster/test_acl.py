"""In a Redis Cluster, each command runs as a user with exactly the rules docs/security.md
lists (every node, plus the cluster's additions), and no node refuses it anything."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.upload import Uploader
from rrb_streams.config import VerifyConfig
from rrb_streams.verify.verifier import Verifier
from tests.cli.test_acl import DOC, PASSWORD, documented_rules
from tests.support.cluster import Cluster
from tests.support.cluster_backup import (
    bridge_config,
    upload_config,
    wait_drained,
    write_every_type,
)
from tests.support.pipeline import running
from tests.support.proc import run_command
from tests.support.restoring import fs_spec, opened

pytestmark = pytest.mark.anyio


def cluster_additions() -> list[str]:
    """The rules docs/security.md adds for a cluster, to every user."""
    text = " ".join(DOC.read_text().split())
    found = re.search(r"with its rule above plus `([^`]+)`", text)
    assert found, "docs/security.md names no rules for a Redis Cluster"
    return found[1].split()


def as_user(cluster: Cluster, user: str) -> str:
    port = cluster.masters()[0].port
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{port}/0"


def refusals(cluster: Cluster, users: set[str]) -> list[str]:
    out = []
    for node in cluster.live():
        with node.client() as c:
            for e in c.acl_log(count=1000):
                user, reason, obj = (
                    v.decode() if isinstance(v, bytes) else str(v)
                    for v in (e["username"], e["reason"], e["object"])
                )
                if user in users and reason != "channel":  # see tests/cli/test_acl.py
                    out.append(f"{node.addr} {user}: {reason} {obj}")
    return out


async def test_every_node_serves_each_command_with_exactly_the_documented_rules(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.wait_ok()
    cluster.flush()
    extra = cluster_additions()
    for node in cluster.live():  # replicas too: any may become a master
        with node.client() as c:
            c.execute_command("ACL", "LOG", "RESET")
            for user, rules in documented_rules().items():
                c.execute_command("ACL", "SETUSER", user, "reset", *rules, *extra)
    spec = fs_spec(tmp_path / "b")
    c = cluster.client()
    async with opened(spec) as storage:
        bridge = Bridge(bridge_config(cluster, source_url=as_user(cluster, "rrb-bridge")))
        uploader = Uploader(
            upload_config(cluster, source_url=as_user(cluster, "rrb-upload")), storage
        )
        async with running(bridge, uploader, within=120):
            write_every_type(c, n=20, tag="acl")
            await wait_drained(cluster)
        checked = await Verifier(
            VerifyConfig(
                source_url=as_user(cluster, "rrb-verify"),
                source_cluster=True,
                stream_cluster=True,
                recheck_delay=0.1,
            ).validate(),
            storage,
        ).run()
    assert checked.differences == 0 and checked.checked > 0
    shown = run_command("rrb-status", as_user(cluster, "rrb-status"), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["drained"] is True
    users = {"rrb-bridge", "rrb-upload", "rrb-verify", "rrb-status"}
    assert refusals(cluster, users) == []
