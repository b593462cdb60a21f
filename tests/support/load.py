"""Load for the fault scenarios: a continuous writer, and the check that the backup it leaves
equals the source."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from rrb_streams.storage.fs import FsStorage
from tests.support.dataset import difference, restore_latest, snapshot
from tests.support.servers import RedisServer


class Writer(threading.Thread):
    """A continuous writer: SET, DEL and SET with a TTL on a few thousand keys, 50 a batch."""

    def __init__(self, server: RedisServer, keys: int = 2000) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.keys = keys
        self.halt = threading.Event()
        self.changes = 0

    def run(self) -> None:
        rng = random.Random(7)
        with self.server.client() as c:
            while not self.halt.is_set():
                pipe = c.pipeline(transaction=False)
                for _ in range(50):
                    k = f"w:{rng.randrange(self.keys)}"
                    op = rng.random()
                    if op < 0.6:
                        pipe.set(k, str(rng.random()))
                    elif op < 0.8:
                        pipe.delete(k)
                    else:
                        pipe.set(k, "ttl", ex=3600)
                pipe.execute()
                self.changes += 50
                time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


async def assert_backup_equals_source(
    source: RedisServer, target: RedisServer, folder: Path
) -> int:
    """Restore the backup in ``folder`` into ``target`` and compare it with ``source``
    exactly; returns the number of keys compared."""
    storage = FsStorage(folder)
    try:
        with target.client() as t, source.client() as c:
            await restore_latest(storage, t)
            expected = snapshot(c)
            assert not difference(expected, snapshot(t)), difference(expected, snapshot(t))
            return len(expected)
    finally:
        await storage.close()
