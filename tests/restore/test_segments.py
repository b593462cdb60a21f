"""rrb-restore of the segment layout against real Redis servers: the newest read per key wins
whatever order segments landed in, damaged blocks fail only their keys, a prefix may hold
both layouts, and ``--at`` picks each key's state at any moment."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable
from dataclasses import replace

import anyio
import pytest
import redis

from rrb_streams.format import segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.ranges import FooterStats, read_footers
from rrb_streams.restore.report import exit_status
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.source import Source
from tests.support.dataset import snapshot
from tests.support.pipeline import running_pipeline, wait_drained
from tests.support.restoring import (
    dumped_record,
    expire_at_ms,
    populate_every_type,
    put_latest,
    put_segment,
    restore,
    restore_config,
    source_time_us,
)
from tests.support.servers import RedisServer

Factory = Callable[..., RedisServer]
MiB = 1024 * 1024


def records_of(c: redis.Redis, *, stamp: int) -> list[KeyRecord]:
    """Every key of ``c``'s db 0 as a record stamped ``stamp``."""
    return [
        replace(dumped_record(c, key, expire_at_ms=expire_at_ms(c, key)), stamp=stamp)
        for key in sorted(c.scan_iter(count=1000))
    ]


def value_record(
    key: bytes, value: bytes, *, stamp: int, read_at_us: int, c: redis.Redis
) -> KeyRecord:
    """A record of ``key`` holding the string ``value``, with a real DUMP payload."""
    c.set(b"tmp:dump", value)
    payload = c.dump(b"tmp:dump")
    c.delete(b"tmp:dump")
    assert isinstance(payload, bytes)
    return KeyRecord(key, 0, "string", None, read_at_us, "", "7.0.15", payload, stamp=stamp)


@pytest.mark.anyio
async def test_restore_of_segments_is_exact_over_many_ranges(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        populate_every_type(c, bulk=400)
        records = records_of(c, stamp=1_000)
        expected = snapshot(c)
    # Older states of a third of the keys, in other segments (another key's value): they
    # must lose.
    random.seed(7)
    others = random.sample(records, len(records))
    stale = [
        replace(r, stamp=r.stamp - 1 - i, type=o.type, payload=o.payload, expire_at_ms=None)
        for i, (r, o) in enumerate(zip(records[::3], others[::3], strict=True))
    ]
    random.shuffle(records)
    half = len(records) // 2
    await put_segment(storage, records[:half], block_records=16)
    await put_segment(storage, stale, block_records=7)
    await put_segment(storage, records[half:], block_records=16)
    # A small budget: many ranges, shared by the writers.
    report = await restore(restore_config(target.url(), spec, range_bytes=4_000), storage)
    assert report.totals is not None
    assert report.totals["restored"] == len(expected)
    assert report.totals["failed"] == 0
    assert exit_status(report) == 0
    with target.client() as t:
        assert snapshot(t) == expected


@pytest.mark.anyio
async def test_a_late_landing_stale_segment_never_wins(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        now = source_time_us(c)
        newer = value_record(b"hot", b"new", stamp=200, read_at_us=now, c=c)
        # The stale read landed last, and its host's clock even said it was later: only the
        # stamp taken with the lease says which read came first.
        older = value_record(b"hot", b"old", stamp=100, read_at_us=now + 5_000_000, c=c)
        gone = replace(
            value_record(b"deleted", b"", stamp=300, read_at_us=now, c=c),
            tombstone=True,
            type="none",
            payload=b"",
        )
        alive_before = value_record(b"deleted", b"was-here", stamp=250, read_at_us=now, c=c)
    await put_segment(storage, [newer, gone])
    await put_segment(storage, [older, alive_before])
    report = await restore(restore_config(target.url(), spec), storage)
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["absent"]) == (1, 1)
    with target.client() as t:
        assert t.get(b"hot") == b"new"
        assert t.exists(b"deleted") == 0


@pytest.mark.anyio
async def test_a_damaged_block_fails_its_keys_and_the_rest_are_exact(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        for i in range(100):
            c.set(b"k:%03d" % i, b"v%d" % i)
        records = records_of(c, stamp=10)
    name = await put_segment(storage, records, block_records=10)
    stats = FooterStats()
    blocks = await read_footers(storage, "", stats=stats)
    hit = sorted(blocks, key=lambda b: b.info.offset)[3].info
    data = bytearray(await storage.get(name))
    data[hit.offset + hit.length // 2] ^= 0xFF
    await storage.put(name, bytes(data))
    await storage.flush()

    report = await restore(restore_config(target.url(), spec), storage)
    assert report.totals is not None
    assert report.totals["failed"] == 1  # the block, named
    assert report.totals["restored"] == 90
    assert exit_status(report) == 3
    assert any(f"{name}@{hit.offset}" == failed for failed, _ in report.totals.failures)
    with target.client() as t:
        for i in range(100):
            key = b"k:%03d" % i
            inside = hit.first[1] <= key <= hit.last[1]
            assert t.get(key) == (None if inside else b"v%d" % i)


@pytest.mark.anyio
async def test_a_prefix_holding_both_layouts_restores_each_keys_newest_read(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        t0 = source_time_us(c)

        def rec(key: bytes, value: bytes, at: int, stamp: int = 0) -> KeyRecord:
            return value_record(key, value, stamp=stamp, read_at_us=t0 + at, c=c)

        # Switched from keys to segments: the segment records are newer.
        await put_latest(storage, rec(b"to-segments", b"keys-old", 1))
        seg = [rec(b"to-segments", b"seg-new", 2, stamp=5)]
        # Switched back from segments to keys: the keys object is newer.
        seg.append(rec(b"to-keys", b"seg-old", 1, stamp=6))
        await put_latest(storage, rec(b"to-keys", b"keys-new", 2))
        # Deleted after the switch to segments: the tombstone is the newest read.
        await put_latest(storage, rec(b"deleted", b"keys-old", 1))
        tomb = rec(b"deleted", b"", 2, stamp=7)
        seg.append(replace(tomb, tombstone=True, type="none", payload=b""))
        seg.append(rec(b"only-segments", b"s", 1, stamp=8))
        await put_latest(storage, rec(b"only-keys", b"k", 1))
    await put_segment(storage, seg)
    report = await restore(restore_config(target.url(), spec), storage)
    assert report.totals is not None
    assert report.totals["failed"] == 0
    with target.client() as t:
        assert t.get(b"to-segments") == b"seg-new"
        assert t.get(b"to-keys") == b"keys-new"
        assert t.exists(b"deleted") == 0
        assert t.get(b"only-segments") == b"s"
        assert t.get(b"only-keys") == b"k"
        assert sorted(t.scan_iter()) == [b"only-keys", b"only-segments", b"to-keys", b"to-segments"]


@pytest.mark.anyio
async def test_at_between_every_pair_of_changes_of_a_key(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    """Through the real pipeline with the default layout: no flag at backup time."""
    # The change stream on its own Redis: a FLUSHALL of the source leaves the stored-keys
    # index that tells which keys it removed (README, Limits).
    source, target, streams = redis_factory(), redis_factory(), redis_factory()
    moments: list[tuple[int, dict[bytes, bytes | None]]] = []

    def changes(c: redis.Redis) -> list[Callable[[], object]]:
        return [
            lambda: c.set(b"k", b"v1"),
            lambda: c.set(b"k", b"v2"),
            lambda: c.delete(b"k"),
            lambda: c.set(b"k", b"v3", px=3_600_000),
            lambda: c.rename(b"k", b"moved"),
            lambda: c.set(b"k", b"v4"),
            lambda: c.flushall(),
            lambda: c.set(b"k", b"v5"),
        ]

    async with running_pipeline(
        source.url(), storage, stream_url=streams.url(), upload={"segment_interval": 0.05}
    ):
        with source.client() as c:
            moments.append((source_time_us(c), {}))
            for change in changes(c):
                change()
                await wait_drained(streams.url())
                await anyio.sleep(0.01)  # the next change is read at a later microsecond
                moments.append(
                    (source_time_us(c), {k: c.get(k) for k in (b"k", b"moved") if c.exists(k)})
                )
    seen = set()
    for at_us, expected in moments:
        with target.client() as t:
            t.flushall()
        report = await restore(restore_config(target.url(), spec, at_us=at_us), storage)
        assert report.totals is not None
        assert report.totals["failed"] == 0
        with target.client() as t:
            got = {k: t.get(k) for k in (b"k", b"moved") if t.exists(k)}
        assert got == expected, f"--at {at_us}"
        seen.add(tuple(sorted(got.items())))
    assert len(seen) >= 6  # the moments really told different states apart
    segments = [i async for i in storage.list(segment.segments_prefix(""))]
    assert segments, "the default layout wrote no segments"


def dumps(c: redis.Redis, keys: list[bytes]) -> list[tuple[object, object]]:
    """Each key's DUMP and absolute expiry, pipelined."""
    pipe = c.pipeline(transaction=False)
    for k in keys:
        pipe.dump(k)
        pipe.execute_command("PEXPIRETIME", k)
    out = pipe.execute()
    return list(zip(out[::2], out[1::2], strict=True))


@pytest.mark.anyio
async def test_a_restore_of_many_keys_per_range_is_exact(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    """Tens of thousands of RESTORE replies per range arrive over many socket reads."""
    source, target = redis_factory(), redis_factory()
    keys = [b"key:%06d" % i for i in range(30_000)]
    with source.client() as c:
        pipe = c.pipeline(transaction=False)
        for i, key in enumerate(keys):
            pipe.set(key, b"v%d" % i, px=None if i % 7 else 3_600_000)
        pipe.execute()
        expected = dumps(c, keys)
    src = Source(source.url())
    await src.check()
    records: list[KeyRecord] = []
    try:
        for i in range(0, len(keys), 2000):
            chunk = keys[i : i + 2000]
            got = await src.read(0, chunk, [""] * len(chunk))
            records += [replace(r, stamp=5) for r in got if isinstance(r, KeyRecord)]
    finally:
        await src.close()
    random.seed(3)
    random.shuffle(records)
    for i in range(0, len(records), 10_000):
        await put_segment(storage, records[i : i + 10_000])
    report = await restore(restore_config(target.url(), spec), storage, within=120)
    assert report.totals is not None
    assert report.totals["restored"] == len(keys) and report.totals["failed"] == 0
    with target.client() as t:
        assert t.dbsize() == len(keys)
        assert dumps(t, keys) == expected


@pytest.mark.anyio
async def test_a_dry_run_counts_segments_records_and_key_ranges(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    from rrb_streams.restore.planner import preview
    from rrb_streams.restore.report import render_preview

    source = redis_factory()
    with source.client() as c:
        for i in range(300):
            c.set(b"k:%03d" % i, b"v")
        records = records_of(c, stamp=9)
    names = [
        await put_segment(storage, records[:150], block_records=10),
        await put_segment(storage, records[150:], block_records=10),
    ]
    cfg = restore_config(source.url(), spec, dry_run=True, range_bytes=300)
    plan = await preview(cfg, storage, on_foreign=lambda name: None)
    assert (plan.segments, plan.damaged, plan.records) == (2, 0, 300)
    assert plan.ranges > 1 and plan.range_bytes > 0
    assert plan.sample == sorted(names)
    shown = render_preview(plan, cfg, as_json=False)
    assert f"segments: 2, 300 records to read in {plan.ranges} key ranges" in shown


@pytest.mark.anyio
@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_a_large_value_is_backed_up_and_restored_exactly_in_pieces(
    redis_factory: Factory, storage: Storage, spec: StorageSpec
) -> None:
    """A value above the streaming thresholds (a segment of its own, streamed out; a block
    read in pieces; a RESTORE sent in pieces) beside ordinary keys: all exact."""
    from rrb_streams.backup.segments import STREAM_BYTES
    from rrb_streams.format.large import LARGE_BLOCK

    source, target = redis_factory(), redis_factory()
    size = max(STREAM_BYTES, LARGE_BLOCK) + 12345
    with source.client() as c:
        c.set(b"big", random.randbytes(size))
        c.pexpire(b"big", 3_600_000)
        populate_every_type(c, bulk=50)
        expected = snapshot(c)
    # Memory the value costs Python objects (hiredis's own read buffer is not traced): once
    # as read and, per piece, a part; never the copies a whole-object encoding makes.
    tracemalloc.start()
    try:
        async with running_pipeline(source.url(), storage):
            await wait_drained(source.url(), within=60)
        backup_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if spec.kind == "fs":  # (the moto server runs in this process: its memory counts too)
        assert backup_peak < size + 24 * MiB
    footers = await read_footers(storage, "", stats=FooterStats())
    large = [ref for ref in footers if ref.info.raw_length >= LARGE_BLOCK]
    assert [ref.info.count for ref in large] == [1]
    assert len({ref.name for ref in footers}) >= 2  # the value has an object of its own
    tracemalloc.start()
    try:
        report = await restore(restore_config(target.url(), spec), storage)
        restore_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.totals is not None
    assert report.totals["failed"] == 0
    assert exit_status(report) == 0
    with target.client() as t:
        assert snapshot(t) == expected
        assert t.strlen(b"big") == size
    # The raw block and the record's copy of it, and a piece; never also the compressed
    # block and the packed command.
    if spec.kind == "fs":
        assert restore_peak < 2 * size + 12 * MiB


@pytest.mark.parametrize("expire", [None, 1_900_000_000_123])
@pytest.mark.parametrize("tail", [b"", b"$7\r\nREPLACE\r\n"], ids=["plain", "replace"])
def test_a_restore_sent_in_pieces_is_the_packed_restore_byte_for_byte(
    expire: int | None, tail: bytes
) -> None:
    from rrb_streams.restore.writer import _packed_restore, _restore_pieces

    payload = random.randbytes(2_500_000)
    pieces = _restore_pieces(b"k\r\n\x00ey", expire, payload, tail, piece=1 << 20)
    assert len(pieces) == 5  # head, three slices of the payload, the rest
    assert b"".join(bytes(p) for p in pieces) == _packed_restore(
        b"k\r\n\x00ey", expire, payload, tail
    )
