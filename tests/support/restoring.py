"""Helpers for restore tests: configs, an in-process run, datasets, objects written by hand."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import redis

from rrb_streams.config import RestoreConfig
from rrb_streams.format import builder, codec, layout, segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.restore.run import Report, Restorer
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec, open_storage
from tests.support.proc import run_command

OWN = b"rrb:"

# Short waits everywhere, so a test that goes wrong fails in seconds.
FAST: dict[str, Any] = {"claim_idle": 1.0, "retry_timeout": 5.0, "max_backoff": 0.2}


def fs_spec(path: Path) -> StorageSpec:
    return StorageSpec(kind="fs", path=path)


@asynccontextmanager
async def opened(spec: StorageSpec) -> AsyncIterator[Storage]:
    """The backend ``spec`` names, built as the commands build it, closed on the way out.

    Async tests take the ``storage`` fixture instead, which is built on this.
    """
    storage = open_storage(spec)
    try:
        yield storage
    finally:
        await storage.close()


def restore_config(target_url: str, spec: StorageSpec, **options: Any) -> RestoreConfig:
    """A validated config with short waits; ``options`` override any field."""
    return RestoreConfig(
        target_url=target_url, storage=spec, consumer="test-restore", **{**FAST, **options}
    ).validate()


async def restore(cfg: RestoreConfig, storage: Storage, within: float = 30.0) -> Report:
    """Run one in-process restore to its end and return its report."""
    restorer = Restorer(cfg, storage)
    with anyio.fail_after(within):
        await restorer.run()
    assert restorer.report is not None
    return restorer.report


def own_keys(server_client: redis.Redis) -> dict[int, list[bytes]]:
    """Keys under rrb's own prefix, per db, on one server."""
    found: dict[int, list[bytes]] = {}
    for db in range(16):
        server_client.execute_command("SELECT", db)
        keys = sorted(server_client.scan_iter(match=OWN + b"*", count=1000))
        if keys:
            found[db] = keys
    server_client.execute_command("SELECT", 0)
    return found


def total_keys(server_client: redis.Redis) -> int:
    """Keys in every db of one server (rrb's own included)."""
    info = server_client.info("keyspace")
    return sum(int(v["keys"]) for v in info.values())


def source_time_us(c: redis.Redis) -> int:
    """The server's clock, as the uploader stamps its reads."""
    seconds, micros = c.time()
    return int(seconds) * 1_000_000 + int(micros)


BINARY_KEY = b"s:bin:\x00\xff\r\n#\x80"
BINARY_VALUE = bytes(range(256)) * 3


def populate_every_type(c: redis.Redis, bulk: int = 150) -> None:
    """Every core type in small and large encodings, each with and without a TTL.

    Plus ``bulk`` plain strings, so a restore spans several writer batches.
    """
    ttl = 600_000
    c.set(b"s:plain", b"value")
    c.set(b"s:empty", b"")
    c.set(BINARY_KEY, BINARY_VALUE)
    c.set(b"s:int", b"12345")
    c.set(b"s:ttl", b"expiring", px=ttl)
    c.set(b"s:empty:ttl", b"", px=ttl)
    c.set(b"s:bin:ttl\x00", b"\x00\xff" * 10, px=ttl)
    c.set(b"s:big", b"x" * 100_000)
    for suffix, pttl in ((b"", None), (b":ttl", ttl)):
        c.hset(b"h:small" + suffix, mapping={b"f1": b"1", b"f\x00": b"\xff"})
        c.hset(b"h:large" + suffix, mapping={b"f%d" % i: b"v" * (i % 70) for i in range(300)})
        c.rpush(b"l:small" + suffix, b"a", b"", b"\x00b")
        c.rpush(b"l:large" + suffix, *[b"item-%d" % i for i in range(1000)])
        c.sadd(b"set:int" + suffix, 1, 2, 3, 500)
        c.sadd(b"set:large" + suffix, *[b"member-%d" % i for i in range(300)])
        c.zadd(b"z:small" + suffix, {b"a": 1.5, b"b": -2.0, b"c": 1e10})
        c.zadd(b"z:large" + suffix, {b"m%d" % i: i / 7 for i in range(300)})
        c.xadd(b"x:small" + suffix, {b"f": b"v"})
        for i in range(200):
            c.xadd(b"x:large" + suffix, {b"n": b"%d" % i, b"pad": b"p" * 20})
        c.xgroup_create(b"x:large" + suffix, b"readers", id=b"0")
        if pttl is not None:
            for key in (b"h:small", b"h:large", b"l:small", b"l:large", b"set:int"):
                c.pexpire(key + suffix, pttl)
            for key in (b"set:large", b"z:small", b"z:large", b"x:small", b"x:large"):
                c.pexpire(key + suffix, pttl)
    for i in range(bulk):
        c.set(b"bulk:%04d" % i, b"value-%d" % i, px=ttl if i % 3 == 0 else None)


def dumped_record(
    c: redis.Redis,
    key: bytes,
    *,
    db: int = 0,
    read_at_us: int | None = None,
    expire_at_ms: int | None = None,
) -> KeyRecord:
    """A record of ``key`` as it is now in ``c``'s db, with a real ``DUMP`` payload."""
    payload = c.dump(key)
    assert isinstance(payload, bytes), f"{key!r} does not exist"
    kind = c.type(key).decode()
    version = c.info("server")["redis_version"]
    return KeyRecord(
        key=key,
        db=db,
        type=kind,
        expire_at_ms=expire_at_ms,
        read_at_us=source_time_us(c) if read_at_us is None else read_at_us,
        entry_id="",
        redis_version=str(version),
        payload=payload,
    )


async def put_latest(
    storage: Storage, rec: KeyRecord, prefix: str = "", *, flush: bool = True
) -> str:
    """Store ``rec`` as its key's latest-state object; returns the object name."""
    name = layout.latest_name(prefix, rec.db, rec.key)
    await storage.put(name, codec.encode(rec))
    if flush:
        await storage.flush()
    return name


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``rrb-restore`` as a real process, with JSON logs on its stderr; ``env`` adds variables."""
    return run_command("rrb-restore", *args, env=env, timeout=timeout)


def expire_at_ms(c: redis.Redis, key: bytes) -> int | None:
    """The key's absolute expiry in ms, or ``None`` when it has none."""
    at = int(c.execute_command("PEXPIRETIME", key))
    assert at != -2, f"{key!r} does not exist"
    return None if at == -1 else at


async def backup_keys(
    c: redis.Redis, storage: Storage, *, db: int = 0, prefix: str = ""
) -> dict[bytes, str]:
    """Store every key of ``c``'s db as a latest-state object, as the uploader would.

    Returns each key's object name.
    """
    names: dict[bytes, str] = {}
    for key in sorted(c.scan_iter(count=1000)):
        if key.startswith(OWN):
            continue
        rec = dumped_record(c, key, db=db, expire_at_ms=expire_at_ms(c, key))
        names[key] = await put_latest(storage, rec, prefix, flush=False)
    await storage.flush()
    return names


async def put_segment(
    storage: Storage, records: list[KeyRecord], prefix: str = "", **encode: Any
) -> str:
    """Store ``records`` as one segment object of level 0, as an uploader would; ``encode``
    passes block sizes to :func:`encode_segment`. Returns the object name."""
    stamps = [r.stamp for r in records]
    name = segment.segment_name(prefix, 0, min(stamps), max(stamps), segment.new_uid())
    await storage.put(name, builder.encode_segment(records, **encode))
    await storage.flush()
    return name
