"""Helpers for uploader tests: a config with short waits, change entries written by hand as
the bridge would write them, and the objects an uploader stored."""

from __future__ import annotations

import time
from typing import Any

import redis

from rrb_streams.config import UploadConfig
from rrb_streams.format import codec, segment
from rrb_streams.format.layout import latest_name
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.keys import DEFAULT_GROUP, OwnKeys
from tests.support.servers import RedisServer

OWN = OwnKeys()
STREAM, DEAD, GROUP = OWN.stream, OWN.dead, DEFAULT_GROUP


def config(server: RedisServer, **overrides: Any) -> UploadConfig:
    """A validated uploader config for ``server`` with short waits; ``overrides`` win."""
    settings: dict[str, Any] = {
        "layout": "keys",  # most uploader tests count objects; segment tests say so
        "consumer": "u1",
        "concurrency": 2,
        "linger": 0.01,
        "claim_idle": 30.0,
        "lease": 5.0,
        "max_attempts": 3,
        "max_backoff": 0.1,
        "trim_interval": 60.0,
    }
    settings.update(overrides)
    return UploadConfig(source_url=server.url(), **settings).validate()


def note(c: redis.Redis, *keys: bytes | str, db: int = 0, ev: str = "set") -> list[str]:
    """Add one change entry per key, as the bridge would."""
    ids = []
    for key in keys:
        raw = key.encode() if isinstance(key, str) else key
        fields = entry_fields(db, raw, ev, int(time.time() * 1000))
        ids.append(c.xadd(STREAM, fields).decode())  # type: ignore[arg-type]
    return ids


def create_group(c: redis.Redis) -> None:
    c.xgroup_create(STREAM, GROUP, id="0", mkstream=True)


def pending(c: redis.Redis) -> int:
    return int(c.xpending(STREAM, GROUP)["pending"])


def latest(storage: MemoryStorage, key: bytes, db: int = 0) -> codec.KeyRecord | None:
    """``key``'s newest stored state, whatever the layout: its latest-state object, or its
    segment record of the highest stamp when that is not a tombstone."""
    data = storage.objects.get(latest_name("", db, key))
    if data is not None:
        return codec.decode(data)
    best: codec.KeyRecord | None = None
    for rec in segment_records(storage):
        if (rec.db, rec.key) == (db, key) and (best is None or segment.newer(rec, best)):
            best = rec
    return None if best is None or best.tombstone else best


def segment_records(storage: MemoryStorage) -> list[codec.KeyRecord]:
    """Every record of every segment in ``storage``, in name order, then key order."""
    out: list[codec.KeyRecord] = []
    for name in sorted(storage.objects):
        if segment.parse_segment_name(name) is None:
            continue
        _, blocks = segment.decode_segment(storage.objects[name], name)
        for records in blocks:
            assert not isinstance(records, Exception), records
            out += records
    return out
