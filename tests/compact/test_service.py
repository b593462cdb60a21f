"""Automatic compaction beside the uploaders: it compacts under the lease and counts it."""

from __future__ import annotations

import anyio
import pytest

from rrb_streams.compact.lease import lease_key
from rrb_streams.compact.service import AutoCompactor, compact_once
from rrb_streams.config import CompactConfig
from rrb_streams.format import manifest as mf
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.wire.connections import connect
from rrb_streams.wire.keys import OwnKeys
from tests.compact.helpers import History, ago, stored
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_auto_compaction_runs_passes_and_stands_by_when_another_holds_the_lease(
    redis_server: RedisServer,
) -> None:
    storage, history = MemoryStorage(), History()
    for i in range(5):
        await history.write(storage, 20, at_us=ago(100 - i), seed=i)
    cfg = CompactConfig(stream_url=redis_server.url(), level1_every=0.2).validate()
    metrics = Metrics()
    compactor = AutoCompactor(cfg, storage, metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(compactor.run)
        await until(lambda: sample(metrics, "rrb_compaction_runs_total", result="done") >= 1)
        with redis_server.client() as c:
            c.set(lease_key(OwnKeys()), "someone-else", px=60_000)
        await until(lambda: sample(metrics, "rrb_compaction_runs_total", result="standby") >= 1)
        compactor.stop()
    assert sample(metrics, "rrb_compaction_inputs_total") == 5
    assert sample(metrics, "rrb_compaction_outputs_total") == 1
    assert sample(metrics, "rrb_backup_objects", level="1") == 1
    assert sample(metrics, "rrb_compaction_bytes_total", direction="written") > 0
    assert sample(metrics, "rrb_compaction_duration_seconds_count") >= 1
    assert (await mf.read_latest(storage, "")).seq >= 1
    assert await stored(storage) == history.truth()


class SlowStorage(MemoryStorage):
    """Every ranged read takes a while: a pass lasts several leases."""

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        await anyio.sleep(0.05)
        return await super().get_range(name, start, length)


async def slow_backup() -> tuple[SlowStorage, History]:
    """30 small level-0 segments whose merge lasts several 0.3 s leases."""
    storage, history = SlowStorage(), History()
    for i in range(30):
        await history.write(storage, 5, at_us=ago(100 - i), seed=i)
    return storage, history


async def test_a_pass_longer_than_the_lease_keeps_it_and_commits(
    redis_server: RedisServer,
) -> None:
    storage, history = await slow_backup()
    cfg = CompactConfig(stream_url=redis_server.url(), lease=0.3).validate()
    r = connect(redis_server.url())
    try:
        started = anyio.current_time()
        report = await compact_once(cfg, storage, r, get_logger("compact"))
        assert report is not None and anyio.current_time() - started > 1.0
        assert not report.lost and report.steps[0].inputs == 30
    finally:
        await r.aclose()
    assert await stored(storage) == history.truth()


async def test_a_pass_whose_lease_is_taken_stops_and_commits_nothing(
    redis_server: RedisServer,
) -> None:
    storage, history = await slow_backup()
    cfg = CompactConfig(stream_url=redis_server.url(), lease=0.3).validate()
    r = connect(redis_server.url())

    async def steal() -> None:
        await anyio.sleep(0.2)
        await r.set(lease_key(OwnKeys()), "paused-and-replaced", px=60_000)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(steal)
            report = await compact_once(cfg, storage, r, get_logger("compact"))
    finally:
        await r.aclose()
    assert report is not None and report.lost
    assert await mf.manifest_names(storage, "") == []
    assert [i async for i in storage.list("segments/1/")] == []  # no output left behind
    assert await stored(storage) == history.truth()
