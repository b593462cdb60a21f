"""rrb-verify in process: backups made by the real pipeline, then drift behind its back."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from structlog.testing import capture_logs

from rrb_streams.backup.upload import Uploader
from rrb_streams.config import UploadConfig, VerifyConfig
from rrb_streams.format import codec, layout
from rrb_streams.logs import show_key
from rrb_streams.ops.progress import Progress
from rrb_streams.storage.base import Storage
from rrb_streams.verify.report import Summary
from rrb_streams.verify.verifier import Verifier
from tests.support.moto import s3_spec
from tests.support.pipeline import running, running_pipeline, wait_drained
from tests.support.restoring import dumped_record, opened, put_latest
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
FAST = 0.2  # seconds before a difference is checked again


def populate(c: redis.Redis) -> None:
    """A few keys of every core type, some with a TTL."""
    for i in range(20):
        c.set(b"s:%02d" % i, b"value-%d" % i, px=600_000 if i % 4 == 0 else None)
    c.hset(b"h:one", mapping={b"a": b"1", b"b": b"2"})
    c.rpush(b"l:one", b"x", b"y", b"z")
    c.sadd(b"set:one", b"m1", b"m2")
    c.zadd(b"z:one", {b"a": 1.0, b"b": 2.5})
    c.xadd(b"x:one", {b"f": b"v"})
    c.set(b"bin:\x00\xff", b"\x00" * 10, px=900_000)


async def backed_up(server: RedisServer, storage: Storage, *, kind: str = "keys") -> list[bytes]:
    """``populate`` the source and back it up with the real pipeline; the user keys.

    ``kind``: ``keys``, ``versions`` (the keys layout with --versioning) or ``segments``."""
    with server.client() as c:
        populate(c)
        keys = sorted(k for k in c.scan_iter() if not k.startswith(b"rrb:"))
    upload = {"layout": "segments" if kind == "segments" else "keys"}
    async with running_pipeline(
        server.url(), storage, upload={**upload, "versioning": kind == "versions"}
    ):
        await wait_drained(server.url())
    return keys


KINDS = pytest.mark.parametrize("kind", ["keys", "versions", "segments"])


async def verify(server: RedisServer, storage: Storage, **options: Any) -> Summary:
    cfg = VerifyConfig(
        source_url=options.pop("url", server.url()),
        recheck_delay=options.pop("recheck_delay", FAST),
        **options,
    ).validate()
    with anyio.fail_after(20):
        return await Verifier(cfg, storage).run()


def counts(s: Summary) -> tuple[int, int, int]:
    return s.missing, s.stale, s.extra


def uploader_only(url: str, storage: Storage, **options: Any) -> AbstractAsyncContextManager[None]:
    """One uploader and no bridge: only what is in the stream gets written."""
    options = {"layout": "keys", **options}
    worker = Uploader(UploadConfig(source_url=url, linger=0.02, consumer="fix", **options), storage)
    return running(worker, within=60)


@KINDS
async def test_verify_clean_backup_reports_no_difference(
    redis_server: RedisServer, storage: Storage, kind: str
) -> None:
    keys = await backed_up(redis_server, storage, kind=kind)
    s = await verify(redis_server, storage)
    assert (s.checked, *counts(s)) == (len(keys), 0, 0, 0)
    assert s.examples == {"missing": [], "stale": [], "extra": []}
    assert s.changing == 0 and s.queued == 0


@KINDS
async def test_verify_names_missing_stale_and_extra_keys(
    redis_server: RedisServer, storage: Storage, kind: str
) -> None:
    keys = await backed_up(redis_server, storage, kind=kind)
    with redis_server.client() as c:  # the pipeline is stopped: nobody sees these
        c.set(b"s:new", b"never backed up")
        c.set(b"s:01", b"changed value")
        c.pexpire(b"s:02", 500_000)  # same value, new expiry
        c.delete(b"s:03", b"h:one")
        c.set(b"rrb:mine", b"own keys never count")
    s = await verify(redis_server, storage)
    assert counts(s) == (1, 2, 2)
    assert s.checked == len(keys) + 1
    assert s.examples["missing"] == ["db0:s:new"]
    assert sorted(s.examples["stale"]) == ["db0:s:01", "db0:s:02"]
    assert sorted(s.examples["extra"]) == ["db0:h:one", "db0:s:03"]


async def test_verify_does_not_count_a_key_that_changes_during_the_check(
    redis_server: RedisServer, storage: Storage
) -> None:
    await backed_up(redis_server, storage)
    stop = anyio.Event()

    async def writer() -> None:
        r = redis.asyncio.Redis.from_url(redis_server.url())
        try:
            n = 0
            while not stop.is_set():
                n += 1
                await r.incr(b"hot")
                await r.set(b"s:05", b"v%d" % n)
                await anyio.sleep(0.002)
        finally:
            await r.aclose()

    async with running_pipeline(redis_server.url(), storage):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await anyio.sleep(0.3)
            changing = 0
            for _ in range(3):
                s = await verify(redis_server, storage, recheck_delay=0.3)
                assert counts(s) == (0, 0, 0), s
                changing += s.changing
            stop.set()
        assert changing > 0  # differences were seen, and the re-check let them go
        await wait_drained(redis_server.url())
    assert counts(await verify(redis_server, storage)) == (0, 0, 0)


async def test_verify_counts_a_changing_key_once_it_holds_still(
    redis_server: RedisServer, storage: Storage
) -> None:
    """A difference seen twice with the same state on both sides is drift."""
    await backed_up(redis_server, storage)
    with redis_server.client() as c:
        c.set(b"s:07", b"drifted")
    with capture_logs() as logs:
        s = await verify(redis_server, storage, recheck_delay=0.0)
    assert counts(s) == (0, 1, 0)
    found = [e for e in logs if e["event"] == "verify.difference"]
    assert [(e["kind"], e["key"]) for e in found] == [("stale", "s:07")]


async def test_verify_repair_queues_entries_that_the_uploaders_apply(
    redis_server: RedisServer, storage: Storage
) -> None:
    await backed_up(redis_server, storage)
    with redis_server.client() as c:
        c.set(b"s:new", b"missed by the bridge")
        c.delete(b"s:04")
        c.rpush(b"l:one", b"later")
        wrong = dumped_record(c, b"s:10")
    # Behind the pipeline's back: an object lost and one overwritten. The stored-keys index
    # still claims both are current, so only --repair's reset makes the uploader write them.
    await storage.delete(layout.latest_name("", 0, b"s:00"))
    await put_latest(storage, codec.KeyRecord(**{**_fields(wrong), "key": b"s:09"}))
    s = await verify(redis_server, storage, repair=True)
    assert counts(s) == (2, 2, 1)
    assert s.queued == 5
    async with uploader_only(redis_server.url(), storage):
        await wait_drained(redis_server.url())
    again = await verify(redis_server, storage)
    assert counts(again) == (0, 0, 0), again.examples
    assert await storage.get(layout.latest_name("", 0, b"s:00"))


async def test_verify_repair_of_segments_writes_the_keys_again(
    redis_server: RedisServer, storage: Storage
) -> None:
    await backed_up(redis_server, storage, kind="segments")
    with redis_server.client() as c:
        c.set(b"s:new", b"missed by the bridge")
        c.delete(b"s:04")
        c.rpush(b"l:one", b"later")
    s = await verify(redis_server, storage, repair=True)
    assert counts(s) == (1, 1, 1)
    assert s.queued == 3
    async with uploader_only(redis_server.url(), storage, layout="segments"):
        await wait_drained(redis_server.url())
    again = await verify(redis_server, storage)
    assert counts(again) == (0, 0, 0), again.examples
    assert not [n async for n in storage.list("db")], "the keys layout was written"


async def test_verify_a_damaged_block_leaves_its_keys_stale_until_repaired(
    redis_server: RedisServer, storage: Storage
) -> None:
    keys = await backed_up(redis_server, storage, kind="segments")
    (seg,) = [o async for o in storage.list("segments/")]
    data = bytearray(await storage.get(seg.name))
    data[40] ^= 0xFF  # inside the first (only) block
    await storage.put(seg.name, bytes(data))
    await storage.flush()
    with capture_logs() as logs:
        s = await verify(redis_server, storage, repair=True)
    # The block held every key: none is decided by another record, so each is missing.
    assert counts(s) == (len(keys), 0, 0)
    assert s.queued == len(keys)
    assert [e["object"] for e in logs if e["event"] == "verify.corrupt_object"] == [seg.name]
    async with uploader_only(redis_server.url(), storage, layout="segments"):
        await wait_drained(redis_server.url())
    # The new records are newer than anything the damaged block held: decided again.
    assert counts(await verify(redis_server, storage)) == (0, 0, 0)


async def test_verify_repair_writes_only_the_change_stream(
    redis_server: RedisServer, storage: Storage, tmp_path: Path
) -> None:
    await backed_up(redis_server, storage)
    with redis_server.client() as c:
        c.set(b"s:new", b"x")
        before = sorted(p.name for p in (tmp_path / "backup").rglob("*"))
        s = await verify(redis_server, storage, repair=True)
        assert s.queued == 1
        entries = c.xrange(b"rrb:changes", "-", "+")
        last = entries[-1][1]
        assert (last[b"key"], last[b"ev"], last[b"db"]) == (b"s:new", b"verify", b"0")
        assert c.hget(b"rrb:index:0", b"s:new") == b"-"
    assert sorted(p.name for p in (tmp_path / "backup").rglob("*")) == before


async def test_verify_match_limits_both_directions(
    redis_server: RedisServer, storage: Storage
) -> None:
    await backed_up(redis_server, storage)
    with redis_server.client() as c:
        c.set(b"s:new", b"x")
        c.set(b"l:new", b"x")
        c.set(b"s:00", b"changed")
        c.delete(b"z:one")
    s = await verify(redis_server, storage, match="s:*")
    assert counts(s) == (1, 1, 0)
    assert s.checked == 21
    assert (s.examples["missing"], s.examples["stale"]) == (["db0:s:new"], ["db0:s:00"])


async def test_verify_reports_a_damaged_object_as_stale_and_repairs_it(
    redis_server: RedisServer, storage: Storage, tmp_path: Path
) -> None:
    await backed_up(redis_server, storage)
    name = layout.latest_name("", 0, b"s:06")
    (tmp_path / "backup" / name).write_bytes(b"\x89RRB damaged")
    s = await verify(redis_server, storage, repair=True)
    assert counts(s) == (0, 1, 0)
    assert s.examples["stale"] == [name]
    assert s.queued == 1
    async with uploader_only(redis_server.url(), storage):
        await wait_drained(redis_server.url())
    assert counts(await verify(redis_server, storage)) == (0, 0, 0)


async def test_verify_checks_the_urls_db_unless_all_dbs(
    redis_server: RedisServer, storage: Storage
) -> None:
    with redis_server.client(1) as c1, redis_server.client(0) as c0:
        c1.set(b"one", b"in db 1")
        c0.set(b"zero", b"in db 0")
        await put_latest(storage, dumped_record(c1, b"one", db=1))
        await put_latest(storage, dumped_record(c0, b"zero", db=0))
        c1.set(b"lost", b"x")
        await put_latest(storage, dumped_record(c1, b"lost", db=1))
        c1.delete(b"lost")
        c1.set(b"new", b"x")
    s = await verify(redis_server, storage)
    assert (s.checked, *counts(s)) == (1, 0, 0, 0)
    s = await verify(redis_server, storage, url=redis_server.url(1))
    assert (s.checked, *counts(s)) == (3, 1, 0, 1)
    s = await verify(redis_server, storage, all_dbs=True)
    assert (s.checked, *counts(s)) == (4, 1, 0, 1)
    assert s.examples == {"missing": ["db1:new"], "stale": [], "extra": ["db1:lost"]}


async def test_verify_reads_an_s3_backup_under_a_path_prefix(
    redis_server: RedisServer, s3_bucket: str, moto_endpoint: str
) -> None:
    async with opened(s3_spec(s3_bucket, moto_endpoint, base="base/")) as storage:
        with redis_server.client() as c:
            for key in (b"a", b"b", b"c"):
                c.set(key, key * 3)
                await put_latest(storage, dumped_record(c, key), "p/")
            c.delete(b"c")
            c.set(b"d", b"new")
        s = await verify(redis_server, storage, path_prefix="p")
        assert (s.checked, *counts(s)) == (4, 1, 0, 1)
        assert counts(await verify(redis_server, storage, path_prefix="other")) == (3, 0, 0)


async def test_verify_ignores_a_new_encoding_of_the_same_value(
    redis_server: RedisServer, storage: Storage
) -> None:
    """DUMP bodies are compared without their RDB version and checksum footer."""
    with redis_server.client() as c:
        c.set(b"k", b"v")
        rec = dumped_record(c, b"k")
    payload = rec.payload[:-10] + b"\x0a\x00" + b"\x00" * 8  # another RDB version, any CRC
    other = codec.KeyRecord(**{**_fields(rec), "payload": payload})
    await put_latest(storage, other)
    assert counts(await verify(redis_server, storage)) == (0, 0, 0)


def _fields(rec: codec.KeyRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in rec.__slots__}


async def test_verify_shows_progress_as_log_lines_off_a_terminal(
    redis_server: RedisServer, storage: Storage
) -> None:
    keys = await backed_up(redis_server, storage)
    cfg = VerifyConfig(source_url=redis_server.url(), recheck_delay=FAST).validate()
    await Verifier(
        cfg,
        storage,
        progress=lambda unit: Progress(tty=False, log=_Log(), event="verify.progress", unit=unit),
    ).run()
    assert _Log.lines[-2]["done"] == len(keys)
    assert _Log.lines[-1]["done"] >= len(keys)  # the source pass counts rrb's keys too


class _Log:
    lines: list[dict[str, Any]] = []  # noqa: RUF012 - one test's scratch list

    def info(self, event: str, **fields: Any) -> None:
        assert event == "verify.progress"
        self.lines.append(fields)


def test_example_names_escape_binary_keys_and_control_characters() -> None:
    assert show_key(b"k\xff\x00\n", 3) == "db3:k\\xff\\x00\\x0a"
    assert show_key("ключ".encode()) == "ключ"
    assert show_key(b"x" * 300) == "x" * 200 + "…"


@KINDS
async def test_verify_counts_a_stored_state_whose_expiry_passed_as_absent(
    redis_server: RedisServer, storage: Storage, kind: str
) -> None:
    """A key that expired while no bridge listened still has its live record in storage; a
    restore would skip it, so verify must not call it extra."""
    with redis_server.client() as c:
        c.set(b"short", b"lived", px=1500)
    keys = await backed_up(redis_server, storage, kind=kind)
    assert b"short" in keys
    with redis_server.client() as c:
        await until(lambda: c.exists(b"short") == 0, within=5)
    s = await verify(redis_server, storage)
    assert counts(s) == (0, 0, 0), s.examples
