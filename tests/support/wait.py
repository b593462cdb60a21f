"""Waiting in tests: poll a condition until it holds, or fail with a message that names it.

Every test waits through these two, never through a loop of its own:

- :func:`wait_for` blocks the thread (sync tests, threads, subprocess scenarios);
- :func:`until` awaits inside an event loop, and takes a plain or an async predicate.

Helpers that say *what* to wait for (:func:`wait_log` here, ``wait_drained`` in
:mod:`tests.support.pipeline`) are built on them.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


def wait_for(
    predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05
) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming it after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {predicate!r}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], object | Awaitable[object]],
    within: float = 20.0,
    interval: float = 0.02,
) -> None:
    """Await until ``predicate()`` (or the awaitable it returns) is true; ``TimeoutError``
    naming it after ``within`` seconds. A ``TimeoutError`` the predicate raises itself (a
    bounded wait inside it) passes through unchanged."""
    with anyio.move_on_after(within):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(interval)
    raise TimeoutError(f"timed out after {within} s waiting for {predicate!r}")


async def wait_log(logs: list[dict[str, Any]], within: float = 10.0, **fields: Any) -> None:
    """Wait until an entry captured by ``structlog.testing.capture_logs`` has all of
    ``fields``, e.g. ``await wait_log(logs, event="bridge.rescan_done")``."""

    def logged() -> bool:
        return any(fields.items() <= entry.items() for entry in logs)

    try:
        await until(logged, within=within)
    except TimeoutError:
        raise TimeoutError(f"no log entry with {fields} within {within} s") from None
