"""A storage wrapper that times every call and counts the bytes written, for the metrics.

Calls pass through unchanged, errors included; each one's duration is observed in
``rrb_storage_call_seconds{op=...}`` whether it succeeded or not, and the bytes of each
successful ``put`` are added to ``rrb_upload_bytes_total``. A listing is passed through
untimed: it is a stream of pages, not one call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

from rrb_streams.ops.metrics import Metrics
from rrb_streams.storage.base import Fetched, ObjectInfo, Storage

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TimedStorage:
    """Wraps ``inner``; see the module docstring. ``close`` is passed through untimed."""

    def __init__(self, inner: Storage, metrics: Metrics) -> None:
        self.inner = inner
        seconds = metrics.histogram(
            "rrb_storage_call_seconds",
            "Duration of storage calls, failed ones included.",
            ["op"],
            buckets=_BUCKETS,
        )
        self._put = seconds.labels("put")
        self._get = seconds.labels("get")
        self._get_range = seconds.labels("get_range")
        self._get_many = seconds.labels("get_many")
        self._delete = seconds.labels("delete")
        self._flush = seconds.labels("flush")
        self._bytes = metrics.counter("rrb_upload_bytes", "Bytes of objects written to storage.")

    @property
    def description(self) -> str:
        return self.inner.description

    async def check(self) -> None:
        await self.inner.check()

    async def put(self, name: str, data: bytes) -> None:
        started = time.perf_counter()
        try:
            await self.inner.put(name, data)
        finally:
            self._put.observe(time.perf_counter() - started)
        self._bytes.inc(len(data))

    async def put_new(self, name: str, data: bytes) -> None:
        started = time.perf_counter()
        try:
            await self.inner.put_new(name, data)
        finally:
            self._put.observe(time.perf_counter() - started)
        self._bytes.inc(len(data))

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        size = 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                size += len(chunk)
                yield chunk

        started = time.perf_counter()
        try:
            await self.inner.put_stream(name, counted())
        finally:
            self._put.observe(time.perf_counter() - started)
        self._bytes.inc(size)

    async def get(self, name: str) -> bytes:
        started = time.perf_counter()
        try:
            return await self.inner.get(name)
        finally:
            self._get.observe(time.perf_counter() - started)

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        started = time.perf_counter()
        try:
            return await self.inner.get_range(name, start, length)
        finally:
            self._get_range.observe(time.perf_counter() - started)

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        started = time.perf_counter()
        try:
            return await self.inner.get_tail(name, length)
        finally:
            self._get_range.observe(time.perf_counter() - started)

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        started = time.perf_counter()
        try:
            return await self.inner.get_many(names)
        finally:
            self._get_many.observe(time.perf_counter() - started)

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def delete(self, name: str) -> None:
        started = time.perf_counter()
        try:
            await self.inner.delete(name)
        finally:
            self._delete.observe(time.perf_counter() - started)

    async def flush(self) -> None:
        started = time.perf_counter()
        try:
            await self.inner.flush()
        finally:
            self._flush.observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.inner.close()


def _conforms(storage: TimedStorage) -> Storage:
    return storage  # the type checker proves TimedStorage is a Storage
