"""Helpers for end-to-end tests: run bridge + uploaders in-process, wait for the drain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol

import anyio
import redis
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from rrb_streams.backup.bridge import Bridge
from rrb_streams.backup.upload import Uploader
from rrb_streams.config import BridgeConfig, UploadConfig
from rrb_streams.ops.status import collect
from rrb_streams.storage.base import Storage
from rrb_streams.wire.keys import OwnKeys
from tests.support.wait import until


class Component(Protocol):
    """A bridge or an uploader: ``run`` until ``stop``."""

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    def stop(self) -> None: ...


@asynccontextmanager
async def running(*components: Component, within: float = 30.0) -> AsyncIterator[None]:
    """``components`` running in this task for the block; stopped, and awaited, when it
    ends. The whole block fails after ``within`` seconds."""
    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            for component in components:
                await tg.start(component.run)
            try:
                yield
            finally:
                for component in components:
                    component.stop()


@asynccontextmanager
async def running_pipeline(
    source_url: str,
    storage: Storage,
    *,
    uploaders: int = 1,
    stream_url: str | None = None,
    bridge: dict[str, Any] | None = None,
    upload: dict[str, Any] | None = None,
) -> AsyncIterator[list[Uploader]]:
    """A bridge and ``uploaders`` upload workers running until the block ends; with
    ``stream_url``, the change stream of both lives on that Redis."""
    bridge_cfg = BridgeConfig(source_url=source_url, stream_url=stream_url, **(bridge or {}))
    bridge_cfg = bridge_cfg.validate()
    base = UploadConfig(
        source_url=source_url, stream_url=stream_url, linger=0.02, **(upload or {})
    ).validate()
    workers = [Uploader(replace(base, consumer=f"test-{i}"), storage) for i in range(uploaders)]
    the_bridge = Bridge(bridge_cfg)
    done = anyio.Event()

    async def run_all(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as inner:
            await inner.start(the_bridge.run)
            for w in workers:
                await inner.start(w.run)
            task_status.started()
        done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run_all)
        try:
            yield workers
        finally:
            the_bridge.stop()
            for w in workers:
                w.stop()
            with anyio.move_on_after(15):
                await done.wait()
            # Whatever did not return within 15 s fails the test through the assertion below.
            tg.cancel_scope.cancel()
    assert done.is_set(), "components did not stop within 15 s of stop()"


def drained(c: redis.Redis, own_prefix: str = "rrb:") -> bool:
    """Every group of the change stream on ``c`` has read and acknowledged every entry."""
    stream = OwnKeys(own_prefix).stream
    if not c.exists(stream):
        return False
    groups = c.xinfo_groups(stream)
    last = c.xinfo_stream(stream)["last-generated-id"]
    return bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last for g in groups
    )


async def wait_drained(stream_url: str, own_prefix: str = "rrb:", within: float = 30.0) -> None:
    """Wait until every group acked everything and the stream stopped growing for 0.3 s."""
    own = OwnKeys(own_prefix)
    r = Redis.from_url(stream_url)
    last: str | None = None  # the last id when the stream was last seen drained

    async def drained_and_still() -> bool:
        nonlocal last
        status = await collect(r, own)
        if status.drained and status.last_id == last:
            return True
        last = status.last_id if status.drained else None
        return False

    try:
        await until(drained_and_still, within=within, interval=0.3)
    finally:
        await r.aclose()
