"""In-process storage for unit tests. Everything is lost when the process ends."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Iterable, Sequence

import anyio

from rrb_streams.errors import ObjectExists, ObjectNotFound
from rrb_streams.storage.base import (
    Fetched,
    ObjectInfo,
    Storage,
    check_name,
    check_range,
    get_each,
    slice_range,
)


class MemoryStorage:
    """A dict of name to bytes, with names kept sorted for listing."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._names: list[str] = []  # sorted
        self.puts = 0  # counters that tests read
        self.deletes = 0

    @property
    def description(self) -> str:
        return "memory://"

    async def check(self) -> None:
        return None

    async def put(self, name: str, data: bytes) -> None:
        check_name(name)
        await anyio.lowlevel.checkpoint()
        if name not in self.objects:
            bisect.insort(self._names, name)
        self.objects[name] = bytes(data)
        self.puts += 1

    async def put_new(self, name: str, data: bytes) -> None:
        check_name(name)
        await anyio.lowlevel.checkpoint()
        # No await between the check and the insert: of concurrent writers one wins.
        if name in self.objects:
            raise ObjectExists(f"an object named {name!r} exists in memory://")
        bisect.insort(self._names, name)
        self.objects[name] = bytes(data)
        self.puts += 1

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        check_name(name)
        await self.put(name, await anyio.to_thread.run_sync(b"".join, chunks))

    async def get(self, name: str) -> bytes:
        await anyio.lowlevel.checkpoint()
        try:
            return self.objects[name]
        except KeyError:
            raise ObjectNotFound(f"no object named {name!r} in memory://") from None

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        check_range(name, length)
        return slice_range(await self.get(name), start, length)

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        check_range(name, length)
        data = await self.get(name)
        return data[-length:], len(data)

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        return await get_each(self, names)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        i = bisect.bisect_left(self._names, prefix)
        while i < len(self._names):
            name = self._names[i]
            if not name.startswith(prefix):
                break
            yield ObjectInfo(name, len(self.objects[name]))
            await anyio.lowlevel.checkpoint()
            # The list may have changed while we yielded: continue after ``name``.
            i = bisect.bisect_right(self._names, name)

    async def delete(self, name: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self.objects.pop(name, None) is not None:
            self._names.remove(name)
        self.deletes += 1

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        return None


_: Storage = MemoryStorage()
