"""Waiting in tests: poll a condition until it holds, or fail with a message that names it.

Every test waits through these two, never through a loop of its own:

- :func:`wait_for` blocks the thread (sync tests, threads, subprocess scenarios);
- :func:`until` awaits inside an event loop, and takes a plain or an async predicate.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable

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
    naming it after ``within`` seconds."""
    try:
        with anyio.fail_after(within):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await anyio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"timed out after {within} s waiting for {predicate!r}") from None
