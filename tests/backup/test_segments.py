"""SegmentSink: records of concurrent writers gathered into segment objects, each write
acknowledged only once its segment is durable; flushes on interval, size and idle workers;
backpressure at two segments; failures, timeouts and cancellation reaching every writer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from structlog.testing import capture_logs

from rrb_streams.backup.metrics import UploadMetrics, UploadStats
from rrb_streams.backup.segments import SegmentSink
from rrb_streams.errors import CorruptObject, ObjectRejected, StorageUnavailable
from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.segment import decode_segment, parse_segment_name
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.storage.base import Storage
from rrb_streams.storage.fs import FsStorage
from rrb_streams.storage.memory import MemoryStorage
from tests.support.faulty import FaultyStorage

pytestmark = pytest.mark.anyio

PREFIX = "base/"
SEGMENTS = f"{PREFIX}segments/0/"
KB = b"x" * 1000  # a payload of about 1 KB


def rec(i: int, payload: bytes = b"dump", *, db: int = 0, stamp: int | None = None) -> KeyRecord:
    """Record ``i``: key ``k{i:04d}``, stamp ``1000 + i`` unless given."""
    return KeyRecord(
        key=f"k{i:04d}".encode(),
        db=db,
        type="string",
        expire_at_ms=None,
        read_at_us=1_700_000_000_000_000 + i,
        entry_id=f"1700000000000-{i}",
        redis_version="7.2.4",
        payload=payload,
        stamp=1000 + i if stamp is None else stamp,
    )


def order(r: KeyRecord) -> tuple[int, bytes, int, int]:
    return (r.db, r.key, r.stamp, r.read_at_us)


def decoded(data: bytes, name: str) -> list[KeyRecord]:
    """Every record of a segment object, in the object's order; fails on any damage."""
    _, blocks = decode_segment(data, name)
    out: list[KeyRecord] = []
    for block in blocks:
        assert not isinstance(block, CorruptObject), block
        out.extend(block)
    return out


def segments(memory: MemoryStorage) -> dict[str, list[KeyRecord]]:
    """The segment objects in ``memory``, name to records."""
    return {name: decoded(data, name) for name, data in sorted(memory.objects.items())}


@dataclass(eq=False)
class Writer:
    """One concurrent ``sink.write``: when it finished, how long it took, what it raised."""

    records: list[KeyRecord]
    finished: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None
    took: float = -1.0

    @property
    def done(self) -> bool:
        return self.finished.is_set()


def spawn(tg: TaskGroup, sink: SegmentSink, records: Sequence[KeyRecord]) -> Writer:
    """Start ``sink.write(records)`` in ``tg``; its outcome lands in the returned Writer."""
    w = Writer(list(records))

    async def go() -> None:
        start = anyio.current_time()
        try:
            await sink.write(w.records)
        except Exception as exc:
            w.error = exc
        finally:
            w.took = anyio.current_time() - start
            w.finished.set()

    tg.start_soon(go)
    return w


async def finish(*writers: Writer, within: float = 5.0) -> None:
    """Wait until every writer returned or raised; fail (not hang) after ``within`` s."""
    with anyio.fail_after(within):
        for w in writers:
            await w.finished.wait()


def make_sink(
    storage: Storage,
    *,
    interval: float = 30.0,
    max_bytes: int = 1 << 20,
    workers: int = 2,
    call_timeout: float = 5.0,
    stats: UploadStats | None = None,
    metrics: UploadMetrics | None = None,
    stream_bytes: int = 1 << 30,
) -> SegmentSink:
    return SegmentSink(
        storage,
        PREFIX,
        interval=interval,
        max_bytes=max_bytes,
        workers=workers,
        call_timeout=call_timeout,
        stats=stats if stats is not None else UploadStats(),
        log=get_logger("upload", consumer="u1"),
        metrics=metrics,
        stream_bytes=stream_bytes,
    )


@dataclass
class Rig:
    sink: SegmentSink
    tg: TaskGroup  # for the test's writers
    run_scope: anyio.CancelScope  # cancels sink.run() alone


@asynccontextmanager
async def running(sink: SegmentSink) -> AsyncIterator[Rig]:
    """``sink.run()`` in a task of its own (cancellable through ``run_scope``), and a task
    group for writers; everything is cancelled when the block ends."""
    run_scope = anyio.CancelScope()

    async def run(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with run_scope:
            await sink.run(task_status=task_status)

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        yield Rig(sink, tg, run_scope)
        tg.cancel_scope.cancel()


# --- one write -----------------------------------------------------------------------------


async def test_one_write_is_one_durable_segment_of_exactly_its_records() -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    stats = UploadStats()
    metrics = Metrics()
    upload_metrics = metrics.part(UploadMetrics)
    # Stamps out of key order, two dbs, a tombstone: the object sorts them by (db, key, ...).
    records = [rec(i, b"v%d" % i, db=i % 2, stamp=5000 - 7 * i) for i in range(25)]
    tombstone = KeyRecord.absent(b"gone", 1, 1_700_000_000_999_999, "1-1", "7.2.4")
    records.append(dataclasses.replace(tombstone, stamp=4242))
    sink = make_sink(storage, workers=1, stats=stats, metrics=upload_metrics)
    async with running(sink):
        with anyio.fail_after(5):
            await sink.write(records)
        # Returned: the object is there already, put and flushed (order: the test below).
        assert storage.calls["put"] == 1
        assert storage.calls["flush"] == 1
        [(name, data)] = memory.objects.items()
        assert decoded(data, name) == sorted(records, key=order)
        assert name.startswith(SEGMENTS) and name.endswith(".seg")
        parsed = parse_segment_name(name, PREFIX)
        assert parsed is not None
        assert parsed.level == 0
        assert parsed.min_stamp == min(r.stamp for r in records) == 4242
        assert parsed.max_stamp == max(r.stamp for r in records) == 5000
        assert len(parsed.uid) == 16

        assert stats.segments == 1
        assert stats.segment_records == len(records)
        assert stats.segment_bytes == len(data)
        raw = sum(len(r.key) + len(r.payload) for r in records)
        assert raw < stats.segment_raw_bytes <= raw + 200 * len(records)

        sample = metrics.registry.get_sample_value
        assert sample("rrb_upload_records_per_segment_count") == 1.0
        assert sample("rrb_upload_records_per_segment_sum") == float(len(records))

        # A second write is a second segment; the counters add up.
        more = [rec(100 + i) for i in range(3)]
        with anyio.fail_after(5):
            await sink.write(more)
        assert len(memory.objects) == 2
        assert stats.segments == 2
        assert stats.segment_records == len(records) + 3
        assert stats.segment_bytes == sum(len(d) for d in memory.objects.values())
        assert sample("rrb_upload_records_per_segment_count") == 2.0
        assert sample("rrb_upload_records_per_segment_sum") == float(len(records) + 3)


async def test_a_large_value_is_a_streamed_segment_of_its_own() -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    stats = UploadStats()
    big = rec(2, os.urandom(5000))
    small = [rec(1), rec(3)]
    sink = make_sink(storage, workers=1, stats=stats, stream_bytes=4096)
    async with running(sink):
        with anyio.fail_after(5):
            await sink.write([small[0], big, small[1]])
    assert storage.calls["put"] == 2  # put_stream counts as a put in FaultyStorage
    assert storage.calls["flush"] == 1
    stored = segments(memory)
    assert sorted(stored.values(), key=len) == [[big], small]
    big_name = next(name for name, recs in stored.items() if recs == [big])
    parsed = parse_segment_name(big_name, PREFIX)
    assert parsed is not None and parsed.min_stamp == parsed.max_stamp == big.stamp
    assert stats.segments == 2
    assert stats.segment_records == 3
    assert stats.segment_bytes == sum(len(d) for d in memory.objects.values())


async def test_a_failed_streamed_segment_fails_its_writers() -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.fail_next(1, "put")
    sink = make_sink(storage, workers=1, stream_bytes=4096)
    async with running(sink):
        with anyio.fail_after(5), pytest.raises(StorageUnavailable):
            await sink.write([rec(1), rec(2, os.urandom(5000))])
    assert memory.objects == {}


async def test_empty_write_returns_at_once_and_writes_nothing() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, workers=8)
    async with running(sink):
        with anyio.fail_after(1):
            await sink.write([])
        await anyio.wait_all_tasks_blocked()
        assert memory.objects == {}


async def test_write_waits_for_the_flush_after_the_put() -> None:
    """Durable means flushed: a write whose object is put but not yet flushed has not
    returned."""
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.hang("flush")
    sink = make_sink(storage, workers=1)
    async with running(sink) as rig:
        w = spawn(rig.tg, sink, [rec(1), rec(2)])
        with anyio.fail_after(5):
            await storage.wait_hanging("flush")
        await anyio.wait_all_tasks_blocked()
        assert len(memory.objects) == 1  # put, not yet flushed
        assert not w.done
        storage.release("flush")
        await finish(w)
        assert w.error is None


# --- when a segment is written -------------------------------------------------------------


async def test_a_lone_writer_waits_out_the_interval() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, interval=0.3, workers=4)
    async with running(sink) as rig:
        w = spawn(rig.tg, sink, [rec(1)])
        await finish(w)
        assert w.error is None
        assert 0.25 <= w.took < 2.0
        assert list(segments(memory).values()) == [[rec(1)]]


async def test_writers_within_the_interval_share_one_segment() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, interval=0.3, workers=4)
    async with running(sink) as rig:
        first = spawn(rig.tg, sink, [rec(1), rec(3)])
        await anyio.sleep(0.1)
        second = spawn(rig.tg, sink, [rec(2)])
        await finish(first, second)
        assert first.error is None and second.error is None
        # The interval runs from the segment's first record, not from each writer's.
        assert 0.25 <= first.took < 2.0
        assert second.took < first.took
        assert list(segments(memory).values()) == [[rec(1), rec(2), rec(3)]]


async def test_all_workers_waiting_write_at_once() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, interval=30.0, workers=2)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1), rec(2)])
        b = spawn(rig.tg, sink, [rec(3)])
        await finish(a, b, within=2.0)
        assert a.error is None and b.error is None
        assert list(segments(memory).values()) == [[rec(1), rec(2), rec(3)]]


async def test_fewer_writers_than_workers_do_not_write_early() -> None:
    """The counterpart of the above: one writer short of ``workers``, nothing is written."""
    memory = MemoryStorage()
    sink = make_sink(memory, interval=30.0, workers=3)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1)])
        b = spawn(rig.tg, sink, [rec(2)])
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.2)
        assert not a.done and not b.done
        assert memory.objects == {}
        c = spawn(rig.tg, sink, [rec(3)])  # the last worker arrives
        await finish(a, b, c, within=2.0)
        assert list(segments(memory).values()) == [[rec(1), rec(2), rec(3)]]


async def test_the_end_of_a_backlog_is_written_once_its_busy_workers_wait() -> None:
    """After a segment every worker waited on (a backlog), the next goes as soon as every
    worker holding a batch waits, not an interval later; the one after that waits again."""
    memory = MemoryStorage()
    sink = make_sink(memory, interval=30.0, workers=3)
    async with running(sink) as rig:
        for _ in range(3):
            sink.batch_started()
        backlog = [spawn(rig.tg, sink, [rec(i)]) for i in (1, 2, 3)]
        await finish(*backlog, within=2.0)
        sink.batch_ended()  # two workers found the stream empty
        sink.batch_ended()
        tail = spawn(rig.tg, sink, [rec(4)])  # the one still busy
        await finish(tail, within=2.0)
        assert list(segments(memory).values()) == [[rec(1), rec(2), rec(3)], [rec(4)]]
        sink.batch_ended()
        # A trickle after the backlog: one busy worker, but back to the interval.
        sink.batch_started()
        trickle = spawn(rig.tg, sink, [rec(5)])
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.2)
        assert not trickle.done
        assert len(memory.objects) == 2


async def test_busy_workers_alone_wait_out_the_interval_without_a_backlog() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, interval=30.0, workers=3)
    async with running(sink) as rig:
        sink.batch_started()
        w = spawn(rig.tg, sink, [rec(1)])
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.2)
        assert not w.done
        assert memory.objects == {}


async def test_max_bytes_cuts_segments() -> None:
    memory = MemoryStorage()
    max_bytes = 2048
    sink = make_sink(memory, interval=30.0, max_bytes=max_bytes, workers=4)
    batches = [[rec(10 * w + i, KB) for i in range(6)] for w in range(4)]
    async with running(sink) as rig:
        writers = [spawn(rig.tg, sink, batch) for batch in batches]
        await finish(*writers)
    assert [w.error for w in writers] == [None] * 4
    written = segments(memory)
    # 24 records of about 1 KB, at most about 2 KB a segment.
    assert len(written) >= 8
    for records in written.values():
        assert records
        assert sum(len(r.payload) for r in records) <= max_bytes + len(KB)
    every = [r for records in written.values() for r in records]
    expected = [r for batch in batches for r in batch]
    assert sorted(every, key=order) == sorted(expected, key=order)  # each exactly once


async def test_one_write_larger_than_max_bytes_spans_segments() -> None:
    memory = MemoryStorage()
    sink = make_sink(memory, interval=30.0, max_bytes=2048, workers=1)
    records = [rec(i, KB) for i in range(7)]
    async with running(sink):
        with anyio.fail_after(5):
            await sink.write(records)
    written = segments(memory)
    assert len(written) >= 3
    assert sorted((r for rs in written.values() for r in rs), key=order) == records


# --- backpressure --------------------------------------------------------------------------


async def test_at_most_two_segments_a_third_writer_waits_for_the_first_put() -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.hang("put")
    # Two 1 KB records fill a segment. Workers > writers: only size and interval flush.
    sink = make_sink(storage, interval=0.2, max_bytes=2048, workers=8)
    a_recs = [rec(1, KB), rec(2, KB)]
    b_recs = [rec(3, KB), rec(4, KB)]
    c_recs = [rec(5, KB)]
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, a_recs)  # segment 1, full: being written, its put hangs
        with anyio.fail_after(5):
            await storage.wait_hanging("put")
        b = spawn(rig.tg, sink, b_recs)  # segment 2, full: gathering, waits for segment 1
        await anyio.wait_all_tasks_blocked()
        c = spawn(rig.tg, sink, c_recs)  # would be a third segment in memory: must wait
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(0.3)  # longer than the interval: still nothing moves
        assert storage.calls["put"] == 1
        assert not a.done and not b.done and not c.done
        storage.release("put")
        await finish(a, b, c)
    assert [a.error, b.error, c.error] == [None, None, None]
    # C's record went into a segment of its own, after the first PUT: never into B's.
    assert sorted(segments(memory).values(), key=lambda rs: rs[0].stamp) == [
        a_recs,
        b_recs,
        c_recs,
    ]


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [StorageUnavailable, ObjectRejected])
async def test_a_failed_put_fails_every_writer_of_its_segment(
    error: type[StorageUnavailable] | type[ObjectRejected],
) -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.fail_next(1, "put", error=error)
    stats = UploadStats()
    with capture_logs() as logs:
        sink = make_sink(storage, workers=2, stats=stats)
        async with running(sink) as rig:
            a = spawn(rig.tg, sink, [rec(1), rec(2)])
            b = spawn(rig.tg, sink, [rec(3)])
            await finish(a, b)
            for w in (a, b):
                assert type(w.error) is error, w.error
                assert "injected failure" in str(w.error)
            assert memory.objects == {}
            assert stats.segments == 0 and stats.segment_records == 0
            # Storage is back: the next writes succeed, in a new segment of their records.
            c = spawn(rig.tg, sink, [rec(4)])
            d = spawn(rig.tg, sink, [rec(5)])
            await finish(c, d)
            assert c.error is None and d.error is None
            assert list(segments(memory).values()) == [[rec(4), rec(5)]]
            assert stats.segments == 1 and stats.segment_records == 2
    failed = [e for e in logs if e["event"] == "upload.segment_failed"]
    assert len(failed) == 1 and failed[0]["records"] == 3


async def test_a_failed_flush_fails_the_writers() -> None:
    """The PUT returned but the flush did not: not durable, so no writer is acknowledged."""
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.fail_next(1, "flush")
    stats = UploadStats()
    sink = make_sink(storage, workers=2, stats=stats)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1)])
        b = spawn(rig.tg, sink, [rec(2)])
        await finish(a, b)
        assert isinstance(a.error, StorageUnavailable)
        assert isinstance(b.error, StorageUnavailable)
        assert stats.segments == 0
        c = spawn(rig.tg, sink, [rec(3)])
        d = spawn(rig.tg, sink, [rec(4)])
        await finish(c, d)
        assert c.error is None and d.error is None
        assert stats.segments == 1 and stats.segment_records == 2


async def test_a_put_longer_than_call_timeout_fails_the_writers() -> None:
    memory = MemoryStorage()
    storage = FaultyStorage(memory)
    storage.hang("put")
    sink = make_sink(storage, workers=2, call_timeout=0.2)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1)])
        b = spawn(rig.tg, sink, [rec(2)])
        await finish(a, b)
        for w in (a, b):
            assert isinstance(w.error, StorageUnavailable), w.error
            assert "0.2 s" in str(w.error)
            assert 0.15 <= w.took < 2.0
        assert memory.objects == {}
        storage.release("put")
        c = spawn(rig.tg, sink, [rec(3)])
        d = spawn(rig.tg, sink, [rec(4)])
        await finish(c, d)
        assert c.error is None and d.error is None
        assert list(segments(memory).values()) == [[rec(3), rec(4)]]


async def test_cancelling_run_fails_the_writers_of_the_segment_being_written() -> None:
    storage = FaultyStorage(MemoryStorage())
    storage.hang("put")
    sink = make_sink(storage, workers=2)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1)])
        b = spawn(rig.tg, sink, [rec(2)])
        with anyio.fail_after(5):
            await storage.wait_hanging("put")
        rig.run_scope.cancel()
        await finish(a, b, within=2.0)
        for w in (a, b):
            assert isinstance(w.error, StorageUnavailable), w.error
            assert "did not finish" in str(w.error)


async def test_cancelling_run_fails_the_writers_of_the_gathering_segment_too() -> None:
    storage = FaultyStorage(MemoryStorage())
    storage.hang("put")
    sink = make_sink(storage, interval=30.0, max_bytes=2048, workers=8)
    async with running(sink) as rig:
        a = spawn(rig.tg, sink, [rec(1, KB), rec(2, KB)])  # full: being written
        with anyio.fail_after(5):
            await storage.wait_hanging("put")
        b = spawn(rig.tg, sink, [rec(3)])  # gathering
        await anyio.wait_all_tasks_blocked()
        rig.run_scope.cancel()
        await finish(a, within=2.0)
        assert isinstance(a.error, StorageUnavailable)
        with anyio.move_on_after(1.0):
            await b.finished.wait()
        assert b.done, "a writer of the gathering segment hangs after run() was cancelled"
        assert isinstance(b.error, StorageUnavailable)


# --- a real filesystem ---------------------------------------------------------------------


async def test_fs_storage_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "backup"
    storage = FsStorage(root)
    stats = UploadStats()
    sink = make_sink(storage, workers=1, stats=stats)
    records = [rec(i, b"payload-%d" % i, stamp=2000 - i) for i in range(40)]
    try:
        async with running(sink):
            with anyio.fail_after(5):
                await sink.write(records)
            files = [p for p in root.rglob("*") if p.is_file()]
            assert len(files) == 1  # no temporary file left beside it
            [path] = files
            name = path.relative_to(root).as_posix()
            assert name.startswith(SEGMENTS)
            parsed = parse_segment_name(name, PREFIX)
            assert parsed is not None
            assert (parsed.min_stamp, parsed.max_stamp) == (1961, 2000)
            data = path.read_bytes()
            assert data == encode_segment(records)
            assert decoded(data, name) == sorted(records, key=order)
            assert stats.segment_bytes == len(data)
    finally:
        await storage.close()
