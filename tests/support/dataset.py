"""Exact dataset snapshots, and a minimal restore from storage, for end-to-end tests.

``snapshot`` captures type, value and absolute expiry of every key (rrb's own keys left out),
so two Redis servers can be compared exactly. ``restore_latest`` reads the latest objects back
into a Redis with ``RESTORE … ABSTTL``; it is a test helper, not the product's restore.
"""

from __future__ import annotations

from typing import Any

import redis

from rrb_streams.format import codec, layout, segment
from rrb_streams.format.view import list_segments
from rrb_streams.storage.base import Storage

Snapshot = dict[tuple[int, bytes], tuple[str, Any, int]]


def _value(c: redis.Redis, key: bytes, kind: str) -> Any:
    if kind == "string":
        return c.get(key)
    if kind == "hash":
        return sorted(c.hgetall(key).items())
    if kind == "list":
        return c.lrange(key, 0, -1)
    if kind == "set":
        return sorted(c.smembers(key))
    if kind == "zset":
        return c.zrange(key, 0, -1, withscores=True)
    if kind == "stream":
        return c.xrange(key)
    raise AssertionError(f"unexpected type {kind} of {key!r}")


def snapshot(c: redis.Redis, db: int = 0, own_prefix: bytes = b"rrb:") -> Snapshot:
    """Every key's (type, value, absolute expiry ms or -1) in ``db``."""
    c.execute_command("SELECT", db)
    out: Snapshot = {}
    for key in c.scan_iter(count=1000):
        if key.startswith(own_prefix):
            continue
        kind = c.type(key).decode()
        if kind == "none":
            continue
        value = _value(c, key, kind)
        expire = int(c.execute_command("PEXPIRETIME", key))
        if expire == -2:
            continue  # expired between SCAN and now
        out[(db, key)] = (kind, value, expire)
    return out


def difference(expected: Snapshot, got: Snapshot, examples: int = 5) -> str:
    """How ``got`` differs from ``expected``, with a few keys of each kind; "" when equal."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    differ = [k for k in expected if k in got and got[k] != expected[k]]
    if not (missing or extra or differ):
        return ""
    shown = [f"{k}: {got[k]!r}, expected {expected[k]!r}" for k in differ[:examples]]
    return (
        f"missing {len(missing)} {missing[:examples]}; extra {len(extra)} {extra[:examples]}; "
        f"different {len(differ)}: " + "; ".join(shown)
    )


async def latest_records(
    storage: Storage, prefix: str = ""
) -> dict[tuple[int, bytes], codec.KeyRecord]:
    """Every key's newest stored record that is not a tombstone, whatever the layout: the
    segments' highest stamp per key, and the keys layout's newest object where it was read
    later. A test's reading of the backup, independent of the restore's machinery."""
    newest: dict[tuple[int, bytes], codec.KeyRecord] = {}
    async for info in list_segments(storage, prefix):
        _, blocks = segment.decode_segment(await storage.get(info.name), info.name)
        for records in blocks:
            assert not isinstance(records, Exception), records
            for rec in records:
                best = newest.get((rec.db, rec.key))
                if best is None or segment.newer(rec, best):
                    newest[(rec.db, rec.key)] = rec
    async for info in storage.list(prefix):
        parsed = layout.parse_name(info.name, prefix)
        if parsed is None:
            continue
        rec = codec.decode(await storage.get(info.name), info.name)
        best = newest.get((rec.db, rec.key))
        if best is None or rec.read_at_us > best.read_at_us:
            newest[(rec.db, rec.key)] = rec
    return {k: r for k, r in newest.items() if not r.tombstone}


async def restore_latest(storage: Storage, target: redis.Redis, prefix: str = "") -> int:
    """RESTORE every key's newest stored state under ``prefix`` into ``target``. Returns the
    count."""
    count = 0
    for rec in (await latest_records(storage, prefix)).values():
        target.execute_command("SELECT", rec.db)
        if rec.expire_at_ms is None:
            target.restore(rec.key, 0, rec.payload, replace=True)
        else:
            target.restore(rec.key, rec.expire_at_ms, rec.payload, replace=True, absttl=True)
        count += 1
    return count


async def stored_records(storage: Storage, prefix: str = "") -> list[codec.KeyRecord]:
    """Decode every object under ``prefix`` (latest and versions), in name order."""
    return [codec.decode(await storage.get(i.name), i.name) async for i in storage.list(prefix)]
