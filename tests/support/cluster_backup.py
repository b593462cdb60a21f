"""Backing up a real Redis Cluster in tests: configs, a writer that rides out failovers, the
whole cluster's data as one snapshot, and the drain of a change stream kept in the cluster."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.cluster

from rrb_streams.config import BridgeConfig, UploadConfig
from rrb_streams.wire.keys import OwnKeys
from tests.support.cluster import Cluster
from tests.support.dataset import Snapshot, snapshot
from tests.support.wait import until

OWN = OwnKeys("rrb:", cluster=True)


def bridge_config(cluster: Cluster, **overrides: Any) -> BridgeConfig:
    settings: dict[str, Any] = {
        "source_url": cluster.url(),
        "source_cluster": True,
        "stream_cluster": True,
        "topology_interval": 0.3,
        "max_backoff": 0.5,
    }
    return BridgeConfig(**{**settings, **overrides}).validate()


def upload_config(cluster: Cluster, consumer: str = "c0", **overrides: Any) -> UploadConfig:
    settings: dict[str, Any] = {
        "source_url": cluster.url(),
        "source_cluster": True,
        "stream_cluster": True,
        "consumer": consumer,
        "linger": 0.02,
        "lease": 2.0,
        "max_backoff": 0.5,
        "segment_interval": 0.2,
    }
    return UploadConfig(**{**settings, **overrides}).validate()


def cluster_snapshot(cluster: Cluster) -> Snapshot:
    """Every key of every master (rrb's own keys left out), as one single Redis would hold
    them."""
    out: Snapshot = {}
    for master in cluster.masters():
        with master.client() as c:
            out.update(snapshot(c))
    return out


def drained_at(cluster: Cluster, own: OwnKeys = OWN) -> bytes | None:
    """The change stream's last id if it exists in the cluster and every group has acked all
    of it, else ``None``."""
    c = cluster.client()
    try:
        if not c.exists(own.stream):
            return None
        groups = c.xinfo_groups(own.stream)
        last = c.xinfo_stream(own.stream)["last-generated-id"]
    except redis.RedisError:
        return None  # a failover under way
    finally:
        c.close()
    done = bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last for g in groups
    )
    return bytes(last) if done else None


async def wait_drained(cluster: Cluster, within: float = 60.0) -> None:
    """Wait until the stream is drained and has not grown for half a second: events the
    bridge has yet to forward would otherwise pass for a finished backup."""
    seen: list[bytes | None] = [None]

    def still() -> bool:
        now = drained_at(cluster)
        done = now is not None and now == seen[0]
        seen[0] = now
        return done

    await until(still, within=within, interval=0.5)


def write_every_type(c: redis.cluster.RedisCluster, n: int = 60, tag: str = "") -> None:
    """Keys of every type, some with a TTL, spread over the slots."""
    for i in range(n):
        c.set(f"s{tag}:{i}", f"v{i}")
        c.hset(f"h{tag}:{i}", mapping={"f": str(i), "g": "x" * i})
        c.rpush(f"l{tag}:{i}", *[str(j) for j in range(i % 7 + 1)])
        c.sadd(f"set{tag}:{i}", *[str(j) for j in range(i % 5 + 1)])
        c.zadd(f"z{tag}:{i}", {"a": i, "b": -i})
        c.xadd(f"x{tag}:{i}", {"f": str(i)})
        if i % 3 == 0:
            c.pexpire(f"s{tag}:{i}", 600_000)
    c.delete(*[f"s{tag}:{i}" for i in range(0, n, 10)])


class Writer:
    """A thread writing to ``keys`` keys through a cluster client until stopped, riding out
    failovers (a write refused meanwhile is retried; the cluster's final state is what a
    backup must equal)."""

    def __init__(
        self, cluster: Cluster, keys: int = 500, seed: int = 1, deletes: float = 0.05
    ) -> None:
        self._cluster = cluster
        self._keys = keys
        self._deletes = deletes  # the share of writes that delete their key
        self._rnd = random.Random(seed)
        self._stop = threading.Event()
        self.writes = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        c = self._cluster.client()
        try:
            while not self._stop.is_set():
                key = f"w:{self._rnd.randrange(self._keys)}"
                try:
                    if self._rnd.random() < self._deletes:
                        c.delete(key)
                    else:
                        c.set(key, str(self.writes))
                    self.writes += 1
                except redis.RedisError:
                    self.errors += 1
                    self._stop.wait(0.05)
                    c.close()
                    c = self._cluster.client()
                self._stop.wait(0.001)
        finally:
            c.close()

    @contextmanager
    def running(self) -> Iterator[Writer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)
