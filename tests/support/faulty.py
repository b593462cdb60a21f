"""A storage wrapper that injects failures, for tests of everything built on storage.

It wraps any backend and passes calls through unless told otherwise::

    storage = FaultyStorage(MemoryStorage())
    storage.fail_next(2, "put")             # the next two puts raise StorageUnavailable
    storage.fail_next(1)                    # the next call of any method raises
    storage.down = True                     # an outage: every call raises until set False
    storage.reject = lambda name: "bad" in name   # ObjectRejected for those names, forever
    storage.hang("put")                     # puts block ...
    await storage.wait_hanging("put")       # ... (wait until one is blocked) ...
    storage.release("put")                  # ... until released
    storage.fail_list_after(10)             # the next listing breaks after 10 objects
    storage.calls["put"], storage.failures["put"]   # counters, per method

A call goes through these steps in order: it is counted; it blocks while its method hangs;
it fails if ``down``; it fails if a ``fail_next`` budget covers it; it is rejected if
``reject`` matches its name (put, get, delete); then the wrapped backend runs it.
Reads are all ``"get"``: a ``get_range`` is one, a ``get_many`` one per name, so
``fail_next(1, "get")``, ``hang("get")`` and ``calls["get"]`` cover every way of reading.
``close`` is counted and passed through but never fails or hangs, so shutdown paths stay
testable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Literal

import anyio

from rrb_streams.errors import ObjectRejected, StorageUnavailable
from rrb_streams.storage.base import Fetched, ObjectInfo, Storage
from rrb_streams.storage.memory import MemoryStorage

Method = Literal["check", "put", "get", "list", "delete", "flush"]
METHODS: tuple[Method, ...] = ("check", "put", "get", "list", "delete", "flush")
_ANY = "*"


class FaultyStorage:
    """Wraps ``inner`` and fails, rejects or hangs calls on demand. See the module docstring.

    Public state tests may read or set: ``inner``, ``down``, ``reject``, ``calls``,
    ``failures`` and ``hanging`` (calls blocked right now, per method).
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.down = False
        self.reject: Callable[[str], bool] | None = None
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.hanging: Counter[str] = Counter()
        self._budget: Counter[str] = Counter()
        self._errors: dict[str, Callable[[str], Exception]] = {}
        self._gates: dict[str, anyio.Event] = {}
        self._entered = anyio.Event()
        self._list_fail_after: int | None = None

    # -- knobs ------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        *methods: Method,
        error: Callable[[str], Exception] = StorageUnavailable,
    ) -> None:
        """Make the next ``n`` calls of ``methods`` (of any method when none are given) raise
        ``error(message)``. Budgets add up; a method's own budget is spent before the shared
        one."""
        for key in methods or (_ANY,):
            self._budget[key] += n
            self._errors[key] = error

    def hang(self, *methods: Method) -> None:
        """Block calls of ``methods`` (all when none are given) until :meth:`release`."""
        for key in methods or METHODS:
            self._gates.setdefault(key, anyio.Event())

    def release(self, *methods: Method) -> None:
        """Let hanging calls of ``methods`` (all when none are given) proceed."""
        keys: tuple[str, ...] = methods or tuple(self._gates)
        for key in keys:
            gate = self._gates.pop(key, None)
            if gate is not None:
                gate.set()

    async def wait_hanging(self, method: Method, count: int = 1) -> None:
        """Return once at least ``count`` calls of ``method`` are blocked by :meth:`hang`."""
        while self.hanging[method] < count:
            await self._entered.wait()

    def fail_list_after(self, n: int) -> None:
        """Make the next listing raise ``StorageUnavailable`` after yielding ``n`` objects."""
        self._list_fail_after = n

    # -- the protocol -----------------------------------------------------------------------

    @property
    def description(self) -> str:
        return self.inner.description

    async def check(self) -> None:
        await self._enter("check", None)
        await self.inner.check()

    async def put(self, name: str, data: bytes) -> None:
        await self._enter("put", name)
        await self.inner.put(name, data)

    async def put_new(self, name: str, data: bytes) -> None:
        await self._enter("put", name)
        await self.inner.put_new(name, data)

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        await self._enter("put", name)
        await self.inner.put_stream(name, chunks)

    async def get(self, name: str) -> bytes:
        await self._enter("get", name)
        return await self.inner.get(name)

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        await self._enter("get", name)
        return await self.inner.get_range(name, start, length)

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        await self._enter("get", name)
        return await self.inner.get_tail(name, length)

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        for name in names:
            await self._enter("get", name)
        return await self.inner.get_many(names)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        await self._enter("list", None)
        fail_after, self._list_fail_after = self._list_fail_after, None
        yielded = 0
        async for info in self.inner.list(prefix):
            if fail_after is not None and yielded >= fail_after:
                self.failures["list"] += 1
                raise StorageUnavailable(f"injected failure: list {prefix!r} after {yielded}")
            yield info
            yielded += 1

    async def delete(self, name: str) -> None:
        await self._enter("delete", name)
        await self.inner.delete(name)

    async def flush(self) -> None:
        await self._enter("flush", None)
        await self.inner.flush()

    async def close(self) -> None:
        self.calls["close"] += 1
        await self.inner.close()

    # -- injection --------------------------------------------------------------------------

    async def _enter(self, method: Method, name: str | None) -> None:
        self.calls[method] += 1
        gate = self._gates.get(method)
        if gate is not None:
            self.hanging[method] += 1
            self._entered.set()
            self._entered = anyio.Event()
            try:
                await gate.wait()
            finally:
                self.hanging[method] -= 1
        else:
            await anyio.lowlevel.checkpoint()
        what = f"{method} {name!r}" if name is not None else method
        if self.down:
            self.failures[method] += 1
            raise StorageUnavailable(f"injected outage: {what}")
        for key in (method, _ANY):
            if self._budget[key] > 0:
                self._budget[key] -= 1
                self.failures[method] += 1
                raise self._errors[key](f"injected failure: {what}")
        if name is not None and self.reject is not None and self.reject(name):
            self.failures[method] += 1
            raise ObjectRejected(f"injected rejection: {what}")


_: Storage = FaultyStorage(MemoryStorage())
