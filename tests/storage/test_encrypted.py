"""AgeStorage beyond the contract (which tests/storage/test_contract.py runs it through): how
many requests an encrypted object costs, and objects stored plain among encrypted ones."""

from __future__ import annotations

import os

import anyio
import pytest

from rrb_streams.crypt import age
from rrb_streams.crypt.keys import AgeKeys
from rrb_streams.errors import CorruptObject
from rrb_streams.storage.encrypted import AgeStorage
from rrb_streams.storage.memory import MemoryStorage
from tests.support.age import AGE_KEYS, ALICE

pytestmark = pytest.mark.anyio


class Counting(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.ranged: list[tuple[str, int, int]] = []

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        self.ranged.append((name, start, length))
        await anyio.sleep(0.01)  # a request in flight while others start
        return await super().get_range(name, start, length)


async def test_reads_of_one_object_at_once_fetch_its_header_once() -> None:
    inner = Counting()
    storage = AgeStorage(inner, AGE_KEYS)
    data = os.urandom(10 * age.CHUNK)
    await storage.put("seg", data)
    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        got[i] = await storage.get_range("seg", i * age.CHUNK + 5, 100)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(read, i)
    assert got == {i: data[i * age.CHUNK + 5 : i * age.CHUNK + 105] for i in range(8)}
    headers = [r for r in inner.ranged if r[1] == 0]
    assert len(headers) == 1, inner.ranged
    assert len(inner.ranged) == 1 + 8  # the header, then one chunk each


async def test_a_small_objects_tail_read_keeps_its_key_for_the_block_reads() -> None:
    inner = Counting()
    storage = AgeStorage(inner, AGE_KEYS)
    data = os.urandom(5000)
    await storage.put("seg", data)
    assert await storage.get_tail("seg", 64 * 1024) == (data, 5000)  # the whole object
    assert await storage.get_range("seg", 100, 50) == data[100:150]
    # One request: the block's chunk (past the header), no fetch of the header again.
    ((name, start, _),) = inner.ranged
    assert name == "seg" and start > 0


async def test_plain_objects_among_encrypted_ones_read_as_they_are() -> None:
    inner = MemoryStorage()
    await inner.put("old", b"written before encryption was on")
    storage = AgeStorage(inner, AGE_KEYS)
    await storage.put("new", b"secret")
    assert age.is_encrypted(inner.objects["new"])
    assert await storage.get("old") == b"written before encryption was on"
    assert await storage.get_range("old", 8, 6) == b"before"
    assert await storage.get_tail("old", 10) == (b"ncryption was on"[-10:], 32)
    assert await storage.get_many(["old", "new"]) == [
        b"written before encryption was on",
        b"secret",
    ]


async def test_a_replaced_object_is_read_with_its_new_key() -> None:
    storage = AgeStorage(MemoryStorage(), AGE_KEYS)
    await storage.put("seg", b"a" * 100_000)
    assert await storage.get_range("seg", 70_000, 3) == b"aaa"
    other = AgeStorage(storage.inner, AGE_KEYS)  # another process replaces it
    await other.put("seg", b"b" * 100_000)
    assert await storage.get_range("seg", 70_000, 3) == b"bbb"


async def test_a_tampered_object_in_get_many_is_given_in_its_place() -> None:
    inner = MemoryStorage()
    storage = AgeStorage(inner, AGE_KEYS)
    await storage.put("a", b"fine")
    await storage.put("b", b"tampered")
    bad = bytearray(inner.objects["b"])
    bad[-3] ^= 1
    inner.objects["b"] = bytes(bad)
    fine, tampered, absent = await storage.get_many(["a", "b", "c"])
    assert fine == b"fine" and isinstance(tampered, CorruptObject)
    assert "fails authentication" in str(tampered) and isinstance(absent, Exception)


async def test_without_recipients_objects_are_stored_plain() -> None:
    inner = MemoryStorage()
    storage = AgeStorage(inner, AgeKeys(identities=(ALICE,)))
    await storage.put("x", b"plain")
    assert inner.objects["x"] == b"plain"
