"""Running long-lived components in one task group, with graceful shutdown on signals.

The first SIGTERM or SIGINT asks every component to stop: each finishes and acknowledges its
in-flight work and returns. Whatever has not returned after the grace period is cancelled.
A second signal cancels at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from rrb_streams.logs import get_logger


class Component(Protocol):
    """Anything ``serve`` can run: ``run`` until ``stop`` is called, then return."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...

    def stop(self) -> None: ...


class StopRequest:
    """A component's stop request, and the waits it cuts short.

    :meth:`stop` sets :attr:`requested` and cancels the wait in progress inside
    :meth:`interruptible`, if any. Only waits belong there (a blocking read, a backoff), never
    a send or a write whose loss would matter.
    """

    def __init__(self) -> None:
        self.requested = False
        self._scope: anyio.CancelScope | None = None

    def stop(self) -> None:
        self.requested = True
        if self._scope is not None:
            self._scope.cancel()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.requested:
                scope.cancel()
            try:
                yield
            finally:
                self._scope = None


async def serve(
    components: Sequence[Component],
    *,
    grace: float,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Start ``components`` in order, run them until they return or a signal stops them."""
    log = get_logger("service")
    async with anyio.create_task_group() as tg:

        async def run_all(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            async with anyio.create_task_group() as workers:
                for component in components:
                    await workers.start(component.run)
                task_status.started()
            # Every component returned by itself: nothing left to wait for.
            tg.cancel_scope.cancel()

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await tg.start(run_all)
            if on_started is not None:
                on_started()
            async for signum in signals:
                log.info("service.stopping", signal=signal.Signals(signum).name, grace=grace)
                for component in components:
                    component.stop()
                with anyio.move_on_after(grace) as waited:
                    async for again in signals:
                        log.warning("service.aborted", signal=signal.Signals(again).name)
                        break
                if waited.cancelled_caught:
                    log.warning("service.grace_expired", grace=grace)
                tg.cancel_scope.cancel()
                break
