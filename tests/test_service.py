"""serve(): components started in order, stopped by the first signal, cancelled after grace or
by a second signal; StopRequest: stop() cuts short the waits inside interruptible() only.

The signals go to this very process while ``serve`` has its receiver open: anyio's receiver
catches them, so pytest never sees them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import MutableMapping, Sequence
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from structlog.testing import capture_logs

from rrb_streams.service import Component, StopRequest, serve
from tests.support.wait import until

pytestmark = pytest.mark.anyio


class Worker:
    """A component that records what happens to it in a journal shared with its siblings.

    ``obeys``: it returns once stopped (after ``finish`` is set, when given: its in-flight
    work), or ignores stop() when False. ``returns``: it returns by itself once that is set.
    """

    def __init__(
        self,
        name: str,
        journal: list[str],
        *,
        obeys: bool = True,
        finish: anyio.Event | None = None,
        returns: anyio.Event | None = None,
    ) -> None:
        self.name = name
        self.journal = journal
        self.obeys = obeys
        self.finish = finish
        self.returns = returns
        self.stop_calls = 0
        self._stopping = StopRequest()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.journal.append(f"{self.name} runs")
        await anyio.lowlevel.checkpoint()  # a sibling started too early would run here
        task_status.started()
        self.journal.append(f"{self.name} started")
        try:
            async with anyio.create_task_group() as tg:
                if self.returns is not None:
                    tg.start_soon(self._return_when, self.returns, tg.cancel_scope)
                with self._stopping.interruptible():
                    await anyio.sleep_forever()
                tg.cancel_scope.cancel()
            if self._stopping.requested and self.finish is not None:
                await self.finish.wait()
        except anyio.get_cancelled_exc_class():
            self.journal.append(f"{self.name} cancelled")
            raise
        self.journal.append(f"{self.name} returned")

    async def _return_when(self, event: anyio.Event, scope: anyio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    def stop(self) -> None:
        self.stop_calls += 1
        self.journal.append(f"{self.name} stop")
        if self.obeys:
            self._stopping.stop()


class Serving:
    """``serve`` running in the background of a test."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.done = anyio.Event()

    async def run(self, components: Sequence[Component], grace: float, journal: list[str]) -> None:
        def on_started() -> None:
            journal.append("on_started")
            self.started.set()

        await serve(components, grace=grace, on_started=on_started)
        self.done.set()


def kill(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- starting and returning -----------------------------------------------------------------


async def test_serve_starts_components_in_order_then_calls_on_started() -> None:
    journal: list[str] = []
    returns = anyio.Event()
    workers = [Worker(n, journal, returns=returns) for n in ("a", "b", "c")]
    serving = Serving()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run, workers, 5.0, journal)
            await serving.started.wait()
            returns.set()
    assert journal[:7] == [
        "a runs",
        "a started",
        "b runs",
        "b started",
        "c runs",
        "c started",
        "on_started",
    ]
    assert sorted(journal[7:]) == ["a returned", "b returned", "c returned"]
    assert all(w.stop_calls == 0 for w in workers)


async def test_serve_returns_once_every_component_returned_by_itself() -> None:
    journal: list[str] = []
    early, late = anyio.Event(), anyio.Event()
    a = Worker("a", journal, returns=early)
    b = Worker("b", journal, returns=late)
    serving = Serving()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run, [a, b], 5.0, journal)
            await serving.started.wait()
            early.set()
            await until(lambda: "a returned" in journal)
            await anyio.wait_all_tasks_blocked()
            assert not serving.done.is_set(), "serve returned while b still runs"
            late.set()
            await serving.done.wait()
    assert journal[-2:] == ["a returned", "b returned"]
    assert a.stop_calls == b.stop_calls == 0


async def test_serve_with_no_components_returns_after_on_started() -> None:
    journal: list[str] = []
    with anyio.fail_after(5):
        await serve([], grace=1.0, on_started=lambda: journal.append("on_started"))
    assert journal == ["on_started"]


# -- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_serve_first_signal_stops_every_component_and_waits_for_them(
    sig: signal.Signals,
) -> None:
    journal: list[str] = []
    finish = anyio.Event()
    workers = [Worker(n, journal, finish=finish) for n in ("a", "b")]
    serving = Serving()
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run, workers, 30.0, journal)
            await serving.started.wait()
            kill(sig)
            await until(lambda: all(w.stop_calls for w in workers))
            await anyio.wait_all_tasks_blocked()
            assert not serving.done.is_set(), "serve returned before its components finished"
            finish.set()
            await serving.done.wait()
    assert sorted(journal[-2:]) == ["a returned", "b returned"]
    assert "a cancelled" not in journal and "b cancelled" not in journal
    assert [w.stop_calls for w in workers] == [1, 1]
    [stopping] = events(logs, "service.stopping")
    assert stopping["signal"] == sig.name
    assert stopping["grace"] == 30.0
    assert not events(logs, "service.grace_expired") and not events(logs, "service.aborted")


async def test_serve_cancels_a_component_that_outlasts_the_grace() -> None:
    journal: list[str] = []
    stubborn = Worker("stubborn", journal, obeys=False)
    polite = Worker("polite", journal)
    serving = Serving()
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run, [polite, stubborn], 0.2, journal)
            await serving.started.wait()
            kill(signal.SIGTERM)
            await serving.done.wait()
    assert "polite returned" in journal
    assert "stubborn cancelled" in journal and "stubborn returned" not in journal
    assert stubborn.stop_calls == 1
    [expired] = events(logs, "service.grace_expired")
    assert expired["grace"] == 0.2
    assert not events(logs, "service.aborted")


async def test_serve_second_signal_aborts_at_once() -> None:
    journal: list[str] = []
    stubborn = Worker("stubborn", journal, obeys=False)
    serving = Serving()
    with capture_logs() as logs, anyio.fail_after(10):  # far below the grace
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run, [stubborn], 600.0, journal)
            await serving.started.wait()
            kill(signal.SIGTERM)
            await until(lambda: stubborn.stop_calls == 1)
            kill(signal.SIGINT)
            await serving.done.wait()
    assert "stubborn cancelled" in journal
    [aborted] = events(logs, "service.aborted")
    assert aborted["signal"] == "SIGINT"
    assert not events(logs, "service.grace_expired")
    assert stubborn.stop_calls == 1


# -- StopRequest ----------------------------------------------------------------------------


async def test_stop_request_cancels_the_wait_in_progress() -> None:
    request = StopRequest()
    waiting = anyio.Event()
    journal: list[str] = []

    async def wait() -> None:
        with request.interruptible():
            waiting.set()
            await anyio.sleep_forever()
        journal.append("after the wait")
        await anyio.lowlevel.checkpoint()  # not cancelled: the stop is for the wait only
        journal.append("went on")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await waiting.wait()
            assert not request.requested
            request.stop()
    assert request.requested
    assert journal == ["after the wait", "went on"]


async def test_stop_request_wait_entered_after_stop_ends_at_once() -> None:
    request = StopRequest()
    request.stop()
    with anyio.fail_after(5):
        with request.interruptible():
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        with request.interruptible():  # and so does every later one
            await anyio.sleep(600)
    assert request.requested


async def test_stop_request_leaves_code_outside_interruptible_alone() -> None:
    request = StopRequest()
    outside = anyio.Event()
    proceed = anyio.Event()
    journal: list[str] = []

    async def work() -> None:
        with request.interruptible():
            await anyio.lowlevel.checkpoint()
        journal.append("wait over")
        outside.set()
        await proceed.wait()  # a send or a write: stop() must not cut it short
        journal.append("write done")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await outside.wait()
            request.stop()
            await anyio.wait_all_tasks_blocked()
            assert journal == ["wait over"]
            proceed.set()
    assert journal == ["wait over", "write done"]


async def test_stop_request_lets_an_interruptible_wait_end_normally() -> None:
    request = StopRequest()
    journal: list[str] = []
    with anyio.fail_after(5):
        with request.interruptible():
            await anyio.lowlevel.checkpoint()
            journal.append("waited")
        journal.append("after")
    assert journal == ["waited", "after"]
    assert not request.requested
    request.stop()  # after the wait: nothing to cancel, and nothing breaks
    assert request.requested


async def test_stop_request_cancels_only_its_own_scope() -> None:
    mine, theirs = StopRequest(), StopRequest()
    journal: list[str] = []
    entered = anyio.Event()

    async def wait(name: str, request: StopRequest) -> None:
        with request.interruptible():
            if name == "theirs":
                entered.set()
            await anyio.sleep_forever()
        journal.append(f"{name} woke")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "mine", mine)
            tg.start_soon(wait, "theirs", theirs)
            await entered.wait()
            await anyio.wait_all_tasks_blocked()
            mine.stop()
            await until(lambda: journal == ["mine woke"])
            await anyio.wait_all_tasks_blocked()
            assert journal == ["mine woke"]
            theirs.stop()
    assert journal == ["mine woke", "theirs woke"]


def test_worker_is_a_component() -> None:
    # mypy proves the test double conforms to the protocol serve() takes.
    component: Component = Worker("w", [])
    assert callable(component.run) and callable(component.stop)
