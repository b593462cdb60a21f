"""A real Redis Cluster of ``redis-server`` processes on 127.0.0.1, for tests.

:class:`Cluster` creates it with ``redis-cli --cluster create`` and changes it the way an
operator would (manual and automatic failover, reshard, add a master, unassigned slots); every
change waits until the cluster is healthy again (:meth:`Cluster.wait_ok`), so a test sees a
settled topology. A missing ``redis-server`` or ``redis-cli`` raises ``ServerError``: tests
fail, never skip.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

import redis
import redis.cluster

from tests.support.servers import RedisServer, ServerError
from tests.support.wait import wait_for

SLOTS = 16384
_claimed: set[int] = set()  # ports (and bus ports) this process handed out
# A node's view: CLUSTER SLOTS as (first, last, owner id), and (node id, master id or "-").
_View = tuple[list[tuple[int, int, str]], tuple[tuple[str, str], ...]]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A port P such that P and its cluster bus port P+10000 are both free (P < 55536).

    Both are taken below the kernel's ephemeral range when it leaves room, so neither an
    outgoing connection nor another test's ``free_port()`` can take them before the server
    binds; a port handed out here is not handed out again in this process."""
    try:
        ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        top = int(ephemeral) - 10000
    except (OSError, ValueError, IndexError):
        top = 22768
    top = top if top > 12000 else 55536
    for _ in range(1000):
        port = random.randrange(10000, top)
        if not {port, port + 10000} & _claimed and _bindable(port) and _bindable(port + 10000):
            _claimed.update((port, port + 10000))
            return port
    raise ServerError("no free port pair (P, P+10000) for a cluster node")


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise ServerError("redis-cli is not installed: run 'apt-get install redis-server'")
    return path


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO) as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


class ClusterNode(RedisServer):
    """One cluster-enabled ``redis-server``; its ``nodes.conf`` stays in its own folder, so a
    restart on the same port rejoins the cluster under the same node id."""

    def __init__(self, workdir: Path, node_timeout_ms: int = 2000, *args: str) -> None:
        super().__init__(
            workdir,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A replica syncs at once rather than after the 5 s diskless delay.
            "--repl-diskless-sync-delay", "0",
            # The topology stays the one the test made: no replica moves to an orphan master.
            "--cluster-allow-replica-migration", "no",
            *args,
        )  # fmt: skip
        self.port = cluster_port()  # the bus port, port+10000, must be free too
        self._id: str | None = None

    def __repr__(self) -> str:
        return f"ClusterNode(127.0.0.1:{self.port})"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, db: int = 0) -> redis.Redis:
        """A plain client of this node alone (MOVED for keys it does not own)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10)

    def start(self) -> ClusterNode:
        super().start()
        self._id = None
        self.node_id()
        return self

    def restart(self) -> ClusterNode:
        self.stop()
        return self.start()

    def node_id(self) -> str:
        """CLUSTER MYID, asked once per start: a killed node keeps its id (and nodes.conf)."""
        if self._id is None:
            with self.client() as c:
                self._id = c.execute_command("CLUSTER", "MYID").decode()
        return self._id

    def command(self, *args: str | int) -> str:
        """A command's reply as text (CLUSTER INFO, CLUSTER NODES), unparsed by redis-py."""
        with self.client() as c:
            reply = c.execute_command(*args)
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def is_master(self) -> bool:
        with self.client() as c:
            return bool(c.execute_command("ROLE")[0] == b"master")

    def replication(self) -> dict[str, object]:
        with self.client() as c:
            return dict(c.info("replication"))

    def slot_view(self) -> list[tuple[int, int, str]]:
        """This node's CLUSTER SLOTS: (first, last, owner's node id), sorted."""
        with self.client() as c:
            rows = c.execute_command("CLUSTER", "SLOTS")
        return sorted((int(r[0]), int(r[1]), r[2][2].decode()) for r in rows)


class Cluster:
    """Cluster nodes under ``workdir`` (one folder each); :meth:`close` kills them all."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.nodes: list[ClusterNode] = []
        self.node_timeout_ms = 2000

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, masters: int = 3, replicas_per_master: int = 1, node_timeout_ms: int = 2000
    ) -> Cluster:
        """Create the cluster (``redis-cli --cluster create`` needs 3 masters or more) and
        wait until it is healthy; on any failure every node started is killed."""
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.node_timeout_ms = node_timeout_ms
        try:
            redis_cli_binary()
            for _ in range(masters * (1 + replicas_per_master)):
                self._new_node()
            self._cli(
                "--cluster", "create", *(n.addr for n in self.nodes),
                "--cluster-replicas", str(replicas_per_master), "--cluster-yes",
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill -9 every node started (by pid); files stay in ``workdir``."""
        for node in self.nodes:
            node.kill()

    def _new_node(self) -> ClusterNode:
        node = ClusterNode(self.dir / f"node{len(self.nodes)}", self.node_timeout_ms)
        self.nodes.append(node)  # before start: close() kills it even if start fails
        return node.start()

    def _cli(self, *args: str, timeout: float = 120.0) -> str:
        cmd = [redis_cli_binary(), *args]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=True,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise ServerError(f"{' '.join(cmd)} failed:\n{e.stdout}\n{e.stderr}") from None
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"{' '.join(cmd)} took over {timeout} s:\n{e.stdout!r}") from None
        return done.stdout

    # --- what the cluster looks like now -------------------------------------------------

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def masters(self) -> list[ClusterNode]:
        """The live nodes that say they are masters now (ROLE), whatever they started as."""
        return [n for n in self.live() if n.is_master()]

    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.live() if not n.is_master()]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return [n for n in self.replicas() if n.replication().get("master_port") == master.port]

    def owner(self, slot: int) -> ClusterNode:
        """The master serving ``slot``, as the first live node sees it."""
        by_id = {n.node_id(): n for n in self.nodes}
        for first, last, owner in self.live()[0].slot_view():
            if first <= slot <= last:
                return by_id[owner]
        raise ServerError(f"slot {slot} is unassigned")

    def slots_of(self, master: ClusterNode) -> int:
        """How many slots ``master`` serves, as the first live node sees it."""
        me = master.node_id()
        return sum(b - a + 1 for a, b, owner in self.live()[0].slot_view() if owner == me)

    def url(self) -> str:
        return self.live()[0].url()

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client (bytes replies) that starts from the first live node."""
        node = self.live()[0]
        return redis.cluster.RedisCluster(host="127.0.0.1", port=node.port, decode_responses=False)

    # --- health ----------------------------------------------------------------------------

    def problem(self) -> str | None:
        """What keeps the cluster from being healthy, or None: every live node says
        cluster_state:ok, knows every node, flags no live node as failing, has no slot
        migrating or importing, and sees the same masters and replicas and the same owners
        for all 16384 slots, all of them live; every live replica's link to its master is up."""
        live_ids = {n.node_id() for n in self.live()}
        views: dict[ClusterNode, _View] = {}
        try:
            for node in self.live():
                view = self._view(node, live_ids)
                if isinstance(view, str):
                    return f"{node}: {view}"
                views[node] = view
        except redis.exceptions.RedisError as e:
            return repr(e)
        if not views:
            return "no live node"
        node, (slots, _roles) = next(iter(views.items()))
        if sum(b - a + 1 for a, b, _ in slots) != SLOTS:
            return f"not all slots assigned: {slots}"
        if {owner for _, _, owner in slots} - live_ids:
            return "a dead node still owns slots"
        if others := [n for n, view in views.items() if view != views[node]]:
            return f"{others} see the cluster unlike {node}"
        return None

    def _view(self, node: ClusterNode, live_ids: set[str]) -> _View | str:
        """``node``'s view of the cluster, or what is wrong with it."""
        state = _fields(node.command("CLUSTER", "INFO")).get("cluster_state")
        if state != "ok":
            return f"cluster_state {state}"
        rows = [line.split() for line in node.command("CLUSTER", "NODES").splitlines()]
        if {r[0] for r in rows} != {n.node_id() for n in self.nodes}:
            return f"knows {len(rows)} nodes, not the {len(self.nodes)} started"
        for node_id, addr, flags, *_, link in (r[:8] for r in rows):
            bad = {"fail", "fail?", "handshake", "noaddr"} & set(flags.split(","))
            if node_id in live_ids and (bad or link != "connected"):
                return f"sees {addr} as {flags} {link}"
        if any(slot.startswith("[") for r in rows for slot in r[8:]):
            return "a slot is migrating or importing"
        info = node.replication()
        if info["role"] != "master" and info.get("master_link_status") != "up":
            return f"replica link {info.get('master_link_status')}"
        # who replicates whom ("-" for a master) among the live nodes
        roles = tuple(sorted((r[0], r[3]) for r in rows if r[0] in live_ids))
        return node.slot_view(), roles

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`problem` finds none; ``ServerError`` with the last one found."""
        last: list[str | None] = [None]

        def healthy() -> bool:
            last[0] = self.problem()
            return last[0] is None

        try:
            wait_for(healthy, timeout=timeout, interval=0.1)
        except TimeoutError:
            raise ServerError(f"cluster not ok after {timeout} s: {last[0]}") from None

    # --- changes -------------------------------------------------------------------------

    def flush(self) -> None:
        """FLUSHALL on every master, then wait until every replica is empty too: one cluster
        serves all the tests of a module."""
        for master in self.masters():
            with master.client() as c:
                c.flushall()

        def empty() -> bool:
            return all(n.command("DBSIZE") == "0" for n in self.live())

        wait_for(empty, timeout=10)

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until every live replica has applied all its master has (equal replication
        offsets), so a master killed -9 next loses no write."""

        def synced() -> bool:
            by_port = {n.port: n for n in self.live()}
            for replica in self.replicas():
                info = replica.replication()
                master = by_port.get(int(str(info["master_port"])))
                if master is None or master.replication()["master_repl_offset"] != info.get(
                    "slave_repl_offset"
                ):
                    return False
            return True

        wait_for(synced, timeout=timeout)

    def failover(self, replica: ClusterNode) -> None:
        """Manual failover (CLUSTER FAILOVER): ``replica`` and its master swap roles."""
        self.wait_ok()
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER")
        wait_for(replica.is_master, timeout=self._failover_timeout())
        self.wait_ok()

    def kill_master(self, master: ClusterNode) -> ClusterNode:
        """Kill -9 ``master``, wait until one of its replicas was promoted (after the node
        timeout) and the cluster is ok again; returns the killed node (see :meth:`restart`)."""
        self.wait_ok()
        replicas = self.replicas_of(master)
        if not replicas:
            raise ServerError(f"{master} has no replica to promote")
        master.kill()

        def promoted() -> bool:
            try:
                return any(r.is_master() for r in replicas)
            except redis.exceptions.RedisError:
                return False

        wait_for(promoted, timeout=self._failover_timeout())
        self.wait_ok()
        return master

    def restart(self, node: ClusterNode) -> ClusterNode:
        """Restart ``node`` on its port with its nodes.conf; a killed master whose slots were
        failed over rejoins as a replica of the new master (empty: there is no persistence)."""
        node.restart()
        self.wait_ok()
        return node

    def reshard(self, source: ClusterNode, target: ClusterNode, slots: int) -> None:
        """Move ``slots`` slots (keys and all) from ``source`` to ``target`` with
        ``redis-cli --cluster reshard``; clients writing meanwhile follow ASK and MOVED."""
        self.wait_ok()
        self._cli(
            "--cluster", "reshard", source.addr,
            "--cluster-from", source.node_id(), "--cluster-to", target.node_id(),
            "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "100",
        )  # fmt: skip
        self.wait_ok()

    def add_master(self) -> ClusterNode:
        """Start an empty node, add it as a master (``--cluster add-node``), then give it its
        share of the slots (``--cluster rebalance --cluster-use-empty-masters``)."""
        self.wait_ok()
        existing = self.live()[0]
        node = self._new_node()
        self._cli("--cluster", "add-node", node.addr, existing.addr)
        self.wait_ok()  # known to every node, and every node to it
        self._cli(
            "--cluster", "rebalance", existing.addr, "--cluster-use-empty-masters",
            "--cluster-yes", "--cluster-pipeline", "100",
        )  # fmt: skip
        self.wait_ok()
        return node

    def unassign(self, slots: Iterable[int]) -> None:
        """CLUSTER DELSLOTS ``slots`` on every live node (the owner first), so they are
        unassigned everywhere and cluster_state is fail; :meth:`assign` undoes it. Keys in
        those slots stay on the old owner."""
        slots = list(slots)
        owners = {self.owner(s) for s in slots}
        for node in sorted(self.live(), key=lambda n: n not in owners):
            with node.client() as c:
                c.execute_command("CLUSTER", "DELSLOTS", *slots)

        def unassigned() -> bool:
            for node in self.live():
                info = _fields(node.command("CLUSTER", "INFO"))
                if info["cluster_state"] != "fail":
                    return False
                if any(a <= s <= b for a, b, _ in node.slot_view() for s in slots):
                    return False
            return True

        wait_for(unassigned, timeout=10)

    def assign(self, slots: Iterable[int], master: ClusterNode) -> None:
        """CLUSTER ADDSLOTS unassigned ``slots`` to ``master``; the other nodes learn it by
        gossip. Waits until the cluster is ok (if no slot is left unassigned)."""
        with master.client() as c:
            c.execute_command("CLUSTER", "ADDSLOTS", *slots)
        self.wait_ok()

    def _failover_timeout(self) -> float:
        return 20.0 + 5 * self.node_timeout_ms / 1000
