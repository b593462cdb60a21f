"""Running long-lived components in one task group, with graceful shutdown on signals.

The first SIGTERM or SIGINT asks every component to stop: each finishes and acknowledges its
in-flight work and returns. Whatever has not returned after the grace period is cancelled.
A second signal cancels at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from rrb_streams.logs import get_logger


class Component(Protocol):
    """Anything ``serve`` can run: ``run`` until ``stop`` is called, then return."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...

    def stop(self) -> None: ...


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
