"""Retrying: capped exponential backoff per task, one log story per outage, and TRANSIENT."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.testing import capture_logs

from rrb_streams.errors import (
    ConfigError,
    CorruptObject,
    ObjectRejected,
    StorageError,
    StorageUnavailable,
)
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics
from rrb_streams.retrying import BASE_DELAY, TRANSIENT, Retrying

pytestmark = pytest.mark.anyio

BOOM = StorageUnavailable("boom")


@dataclass
class Backoff:
    """What ``Retrying`` asked for: the delays it slept, and the jitter bounds it drew from."""

    slept: list[float] = field(default_factory=list)
    jitter_bounds: list[tuple[float, float]] = field(default_factory=list)
    jitter: float | None = 1.0  # what random.uniform returns; None: the real draw


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backoff]:
    """Sleeps that only record their delay, and a jitter the test chooses."""
    seen = Backoff()
    real_uniform = random.uniform

    async def sleep(delay: float) -> None:
        seen.slept.append(delay)
        await anyio.lowlevel.checkpoint()

    def uniform(a: float, b: float) -> float:
        seen.jitter_bounds.append((a, b))
        return real_uniform(a, b) if seen.jitter is None else seen.jitter

    monkeypatch.setattr(anyio, "sleep", sleep)
    monkeypatch.setattr(random, "uniform", uniform)  # retrying draws its jitter here
    yield seen


class Clock:
    """``anyio.current_time`` as the test sets it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(cap: float = 10.0, metrics: Metrics | None = None) -> Retrying:
    return Retrying(get_logger("upload"), "upload", "batch", cap=cap, metrics=metrics)


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- the delay ------------------------------------------------------------------------------


async def test_retrying_delay_doubles_per_failure_up_to_the_cap(backoff: Backoff) -> None:
    r = make(cap=0.3)
    for _ in range(6):
        await r.failed("task", BOOM)
    assert backoff.slept == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3, 0.3])


async def test_retrying_delay_starts_over_after_a_success(backoff: Backoff) -> None:
    r = make()
    for _ in range(3):
        await r.failed("task", BOOM)
    r.succeeded("task")
    await r.failed("task", BOOM)
    assert backoff.slept == pytest.approx([0.05, 0.1, 0.2, 0.05])


async def test_retrying_delay_follows_each_tasks_own_failures(backoff: Backoff) -> None:
    r = make()
    for _ in range(3):
        await r.failed("a", BOOM)
    await r.failed("b", BOOM)
    await r.failed("a", BOOM)
    assert backoff.slept == pytest.approx([0.05, 0.1, 0.2, 0.05, 0.4])
    assert r.consecutive_errors == 5


async def test_retrying_delay_stays_at_the_cap_after_very_many_failures(backoff: Backoff) -> None:
    r = make(cap=2.0)
    for _ in range(1100):  # 2 ** 1099 would overflow a float
        await r.failed("task", BOOM)
    assert backoff.slept[-1] == 2.0
    assert max(backoff.slept) == 2.0


async def test_retrying_jitter_takes_half_to_all_of_the_delay(backoff: Backoff) -> None:
    r = make(cap=0.4)
    backoff.jitter = 0.5
    for _ in range(4):
        await r.failed("task", BOOM)
    assert backoff.jitter_bounds == [(0.5, 1.0)] * 4
    assert backoff.slept == pytest.approx([0.025, 0.05, 0.1, 0.2])


async def test_retrying_real_jitter_stays_within_its_bounds(backoff: Backoff) -> None:
    r = make(cap=0.2)
    backoff.jitter = None
    for _ in range(200):
        await r.failed("task", BOOM)
    capped = backoff.slept[2:]  # from the third failure on, the full delay is the cap
    assert all(0.1 <= d <= 0.2 for d in capped)
    assert len(set(capped)) > 1, "the delays are not jittered"


async def test_retrying_sleeps_the_delay_it_logs(backoff: Backoff) -> None:
    r = make()
    backoff.jitter = 0.7
    with capture_logs() as logs:
        for _ in range(3):
            await r.failed("task", BOOM)
    logged = [e["retry_in"] for e in events(logs, "upload.retry")]
    assert logged == [round(d, 3) for d in backoff.slept]
    assert backoff.slept == pytest.approx([BASE_DELAY * 0.7 * 2**i for i in range(3)])


async def test_retrying_backoff_ends_when_its_scope_is_cancelled() -> None:
    r = make(cap=60.0)
    with anyio.fail_after(5):
        for _ in range(12):  # delays up to a full minute
            with anyio.move_on_after(0) as scope:
                await r.failed("task", BOOM)
            assert scope.cancelled_caught
    assert r.consecutive_errors == 12


# -- the log --------------------------------------------------------------------------------


async def test_retrying_logs_each_failure_with_stage_and_the_groups_count(
    backoff: Backoff,
) -> None:
    r = Retrying(get_logger("bridge"), "bridge", "rescan", cap=1.0)
    with capture_logs() as logs:
        await r.failed("a", StorageUnavailable("bucket gone"))
        await r.failed("b", RedisConnectionError("connection refused"))
        await r.failed("a", OSError(errno.ECONNRESET, "reset"))
    retries = events(logs, "bridge.retry")
    assert [e["stage"] for e in retries] == ["rescan"] * 3
    assert [e["consecutive_errors"] for e in retries] == [1, 2, 3]
    assert [e["log_level"] for e in retries] == ["warning"] * 3
    assert retries[0]["error"] == "StorageUnavailable: bucket gone"
    assert retries[1]["error"] == "ConnectionError: connection refused"
    assert retries[2]["error"].startswith("ConnectionResetError: ")
    assert not events(logs, "bridge.recovered")


async def test_retrying_logs_recovered_once_when_the_last_failing_task_succeeds(
    backoff: Backoff,
) -> None:
    r = make()
    with capture_logs() as logs:
        await r.failed("a", BOOM)
        await r.failed("b", BOOM)
        await r.failed("b", BOOM)
        r.succeeded("a")
        assert not events(logs, "upload.recovered"), "b is still failing"
        assert r.failing
        assert r.consecutive_errors == 3
        r.succeeded("b")
        r.succeeded("b")
        r.succeeded("a")
    [recovered] = events(logs, "upload.recovered")
    assert recovered["stage"] == "batch"
    assert recovered["after_errors"] == 3
    assert recovered["log_level"] == "info"
    assert not r.failing
    assert r.consecutive_errors == 0


async def test_retrying_success_of_a_task_that_never_failed_announces_nothing(
    backoff: Backoff,
) -> None:
    r = make()
    with capture_logs() as logs:
        r.succeeded("bystander")
        await r.failed("a", BOOM)
        r.succeeded("bystander")
    assert not events(logs, "upload.recovered")
    assert r.failing
    assert r.consecutive_errors == 1


async def test_retrying_counts_errors_afresh_after_a_recovery(backoff: Backoff) -> None:
    r = make()
    with capture_logs() as logs:
        await r.failed("a", BOOM)
        await r.failed("a", BOOM)
        r.succeeded("a")
        await r.failed("a", BOOM)
        r.succeeded("a")
    assert [e["consecutive_errors"] for e in events(logs, "upload.retry")] == [1, 2, 1]
    assert [e["after_errors"] for e in events(logs, "upload.recovered")] == [2, 1]


async def test_retrying_forget_lets_the_others_recover_without_the_dropped_task(
    backoff: Backoff,
) -> None:
    r = make()
    with capture_logs() as logs:
        await r.failed("a", BOOM)
        await r.failed("b", BOOM)
        r.forget("b")
        assert r.failing
        assert r.consecutive_errors == 2, "a is still failing: the outage goes on"
        r.succeeded("a")
    [recovered] = events(logs, "upload.recovered")
    assert recovered["after_errors"] == 2
    assert not r.failing


async def test_retrying_forget_of_the_last_failing_task_ends_the_outage_silently(
    backoff: Backoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(anyio, "current_time", clock)
    r = make()
    with capture_logs() as logs:
        await r.failed("a", BOOM)
        clock.now += 5
        r.forget("a")
        r.forget("never-failed")
        r.succeeded("a")
    assert not events(logs, "upload.recovered")
    assert not r.failing
    assert r.consecutive_errors == 0
    assert r.outage_seconds() == 0.0
    await r.failed("a", BOOM)
    assert backoff.slept[-1] == pytest.approx(BASE_DELAY), "a forgotten task starts over"
    assert r.consecutive_errors == 1


async def test_retrying_outage_seconds_run_from_the_first_failure_to_the_recovery(
    backoff: Backoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(anyio, "current_time", clock)
    r = make()
    assert r.outage_seconds() == 0.0
    await r.failed("a", BOOM)
    clock.now += 3
    assert r.outage_seconds() == pytest.approx(3.0)
    await r.failed("b", BOOM)
    clock.now += 2
    r.succeeded("a")
    assert r.outage_seconds() == pytest.approx(5.0), "b still fails: the outage goes on"
    r.succeeded("b")
    assert r.outage_seconds() == 0.0
    clock.now += 10
    await r.failed("a", BOOM)
    clock.now += 1
    assert r.outage_seconds() == pytest.approx(1.0)


# -- metrics --------------------------------------------------------------------------------


async def test_retrying_counts_each_failure_and_its_kind_in_metrics(backoff: Backoff) -> None:
    metrics = Metrics()
    r = make(metrics=metrics)
    other = Retrying(get_logger("bridge"), "bridge", "rescan", cap=1.0, metrics=metrics)
    await r.failed("a", BOOM)
    await r.failed("b", StorageUnavailable("again"))
    await r.failed("a", RedisConnectionError("refused"))
    r.succeeded("a")
    await other.failed("x", RedisTimeoutError("slow"))

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("rrb_retries_total", component="upload") == 3
    assert sample("rrb_retries_total", component="bridge") == 1
    assert sample("rrb_errors_total", component="upload", kind="StorageUnavailable") == 2
    assert sample("rrb_errors_total", component="upload", kind="ConnectionError") == 1
    assert sample("rrb_errors_total", component="bridge", kind="TimeoutError") == 1


async def test_retrying_without_metrics_records_nowhere(backoff: Backoff) -> None:
    r = make(metrics=None)
    await r.failed("a", BOOM)
    assert r.consecutive_errors == 1


# -- TRANSIENT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("connection refused"),
        RedisTimeoutError("timeout"),
        ResponseError("LOADING Redis is loading the dataset in memory"),
        StorageUnavailable("503"),
        StorageError("a storage call failed"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError("socket timeout"),
        OSError(errno.EHOSTUNREACH, "no route to host"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_transient_holds_redis_storage_and_os_errors(exc: Exception) -> None:
    assert isinstance(exc, TRANSIENT)


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad entry"), KeyError("db"), ConfigError("bad flag"), CorruptObject("x")],
    ids=lambda exc: type(exc).__name__,
)
def test_transient_leaves_out_errors_about_the_work_itself(exc: Exception) -> None:
    assert not isinstance(exc, TRANSIENT)


def test_transient_never_holds_cancellation() -> None:
    assert not issubclass(asyncio.CancelledError, TRANSIENT)
    assert not issubclass(KeyboardInterrupt, TRANSIENT)


def test_transient_includes_object_rejected_so_callers_must_catch_it_first() -> None:
    # ObjectRejected is a StorageError: code that retries TRANSIENT must catch it closer to
    # its call, as the module says, or a rejected object would be retried forever.
    assert isinstance(ObjectRejected("too big"), TRANSIENT)
