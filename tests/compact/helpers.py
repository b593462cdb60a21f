"""A model of a backup's history, and what a reader finds in storage at a moment."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rrb_streams.compact.compactor import Compactor, Schedule, now_us
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.ranges import FooterStats, plan_ranges, read_footers, read_range
from rrb_streams.logs import get_logger
from rrb_streams.storage.base import Storage
from tests.support.restoring import put_segment

Key = tuple[int, bytes]


def rec(key: bytes, stamp: int, read_at_us: int, value: bytes | None, db: int = 0) -> KeyRecord:
    if value is None:
        out = KeyRecord.absent(key, db, read_at_us, "1-0", "7.2.0")
        out.stamp = stamp
        return out
    return KeyRecord(key, db, "string", None, read_at_us, "1-0", "7.2.0", value, False, stamp)


@dataclass
class History:
    """Every record uploaders wrote, so any moment's truth can be computed."""

    records: list[KeyRecord] = field(default_factory=list)
    stamp: int = 0

    def make(self, keys: int, *, at_us: int, seed: int, deletes: float = 0.1) -> list[KeyRecord]:
        """One segment's worth: ``keys`` random keys of 200, read at ``at_us``."""
        rnd = random.Random(seed)
        out = []
        for i in range(keys):
            self.stamp = max(self.stamp + 1, at_us + i)
            key = b"key:%03d" % rnd.randrange(200)
            value = None if rnd.random() < deletes else b"v%d" % self.stamp
            out.append(rec(key, self.stamp, at_us + i, value))
        self.records += out
        return out

    def truth(self, at_us: int | None = None) -> dict[Key, bytes]:
        best: dict[Key, KeyRecord] = {}
        for r in self.records:
            if at_us is not None and r.read_at_us > at_us:
                continue
            k = (r.db, r.key)
            if k not in best or (r.stamp, r.read_at_us) > (best[k].stamp, best[k].read_at_us):
                best[k] = r
        return {k: r.payload for k, r in best.items() if not r.tombstone}

    async def write(self, storage: Storage, keys: int, *, at_us: int, seed: int) -> str:
        return await put_segment(storage, self.make(keys, at_us=at_us, seed=seed))


async def stored(storage: Storage, at_us: int | None = None, prefix: str = "") -> dict[Key, bytes]:
    """What a restore at ``at_us`` would write: the winner per key, tombstones left out."""
    stats = FooterStats()
    blocks = await read_footers(storage, prefix, stats=stats, at_us=at_us)
    assert not stats.damaged, stats.damaged
    out: dict[Key, bytes] = {}
    for rng in plan_ranges(blocks, at_us=at_us, budget=4096):
        read = await read_range(storage, rng, at_us=at_us)
        assert not read.damaged, read.damaged
        out.update({k: r.payload for k, (r, _) in read.winners.items() if not r.tombstone})
    return out


async def always() -> bool:
    return True


def compactor(storage: Storage, prefix: str = "", **schedule: Any) -> Compactor:
    settings = {
        "level1_every": 0.0,
        "level2_every": 0.0,
        "snapshot_every": 3600.0,
        "retention": 3600.0,
        "grace": 3600.0,
        **schedule,
    }
    return Compactor(
        storage, prefix, Schedule(**settings), get_logger("compact"), holds=always, writer="test"
    )


def ago(seconds: float) -> int:
    return now_us() - int(seconds * 1e6)
