"""Automatic compaction beside the uploaders: it compacts under the lease and counts it."""

from __future__ import annotations

import anyio
import pytest

from rrb_streams.compact.lease import lease_key
from rrb_streams.compact.service import AutoCompactor
from rrb_streams.config import CompactConfig
from rrb_streams.format import manifest as mf
from rrb_streams.ops.metrics import Metrics
from rrb_streams.storage.memory import MemoryStorage
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
