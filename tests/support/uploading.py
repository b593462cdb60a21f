"""Helpers for uploader tests: a config with short waits, change entries written by hand as
the bridge would write them, and the objects an uploader stored."""

from __future__ import annotations

import time
from typing import Any

import redis

from rrb_streams.config import UploadConfig
from rrb_streams.format import codec
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
    """The record stored as ``key``'s latest-state object, if any."""
    data = storage.objects.get(latest_name("", db, key))
    return None if data is None else codec.decode(data)
