"""FaultyStorage: the failure-injecting wrapper other tests rely on."""

from __future__ import annotations

import anyio
import pytest

from rrb_streams.errors import ObjectNotFound, ObjectRejected, StorageUnavailable
from rrb_streams.storage.base import ObjectInfo
from rrb_streams.storage.memory import MemoryStorage
from tests.support.faulty import FaultyStorage

pytestmark = pytest.mark.anyio


@pytest.fixture
def faulty() -> FaultyStorage:
    return FaultyStorage(MemoryStorage())


async def test_faulty_passes_calls_through(faulty: FaultyStorage) -> None:
    await faulty.check()
    await faulty.put("a", b"1")
    assert await faulty.get("a") == b"1"
    assert [i async for i in faulty.list()] == [ObjectInfo("a", 1)]
    await faulty.delete("a")
    with pytest.raises(ObjectNotFound):
        await faulty.get("a")
    await faulty.flush()
    await faulty.close()
    assert faulty.description == "memory://"
    assert dict(faulty.calls) == {
        "check": 1,
        "put": 1,
        "get": 2,
        "list": 1,
        "delete": 1,
        "flush": 1,
        "close": 1,
    }
    assert sum(faulty.failures.values()) == 0


async def test_faulty_fails_the_next_n_calls_of_one_method(faulty: FaultyStorage) -> None:
    faulty.fail_next(2, "put")
    for _ in range(2):
        with pytest.raises(StorageUnavailable, match="injected failure: put 'k'"):
            await faulty.put("k", b"v")
    await faulty.flush()  # other methods are untouched
    await faulty.put("k", b"v")
    assert await faulty.get("k") == b"v"
    assert faulty.calls["put"] == 3
    assert faulty.failures["put"] == 2


async def test_faulty_fails_the_next_calls_of_any_method(faulty: FaultyStorage) -> None:
    faulty.fail_next(2)
    with pytest.raises(StorageUnavailable):
        await faulty.flush()
    with pytest.raises(StorageUnavailable):
        [i async for i in faulty.list()]
    await faulty.put("k", b"v")


async def test_faulty_spends_a_methods_own_budget_first(faulty: FaultyStorage) -> None:
    faulty.fail_next(1, "put", error=ObjectRejected)
    faulty.fail_next(1)
    with pytest.raises(ObjectRejected):
        await faulty.put("k", b"v")
    with pytest.raises(StorageUnavailable):
        await faulty.put("k", b"v")
    await faulty.put("k", b"v")


async def test_faulty_outage_lasts_until_switched_off(faulty: FaultyStorage) -> None:
    await faulty.put("k", b"v")
    faulty.down = True
    for _ in range(5):
        with pytest.raises(StorageUnavailable, match="outage"):
            await faulty.get("k")
    with pytest.raises(StorageUnavailable):
        await faulty.check()
    await faulty.close()  # shutdown never fails
    faulty.down = False
    assert await faulty.get("k") == b"v"
    assert faulty.failures["get"] == 5


async def test_faulty_rejects_matching_names_for_good(faulty: FaultyStorage) -> None:
    faulty.reject = lambda name: name.startswith("bad/")
    for _ in range(3):
        with pytest.raises(ObjectRejected, match="'bad/1'"):
            await faulty.put("bad/1", b"v")
    await faulty.put("good/1", b"v")
    assert [i.name async for i in faulty.list()] == ["good/1"]


async def test_faulty_hangs_chosen_methods_until_released(faulty: FaultyStorage) -> None:
    faulty.hang("put")
    done: list[str] = []

    async def put(name: str) -> None:
        await faulty.put(name, b"v")
        done.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(put, "a")
            tg.start_soon(put, "b")
            await faulty.wait_hanging("put", 2)
            assert done == []
            await faulty.flush()  # not hung
            faulty.release("put")
    assert sorted(done) == ["a", "b"]
    assert faulty.hanging["put"] == 0


async def test_faulty_hanging_call_can_be_cancelled(faulty: FaultyStorage) -> None:
    faulty.hang()
    with anyio.move_on_after(0.05) as scope:
        await faulty.flush()
    assert scope.cancelled_caught
    assert faulty.hanging["flush"] == 0
    faulty.release()
    await faulty.flush()


async def test_faulty_listing_breaks_midway_once(faulty: FaultyStorage) -> None:
    for i in range(5):
        await faulty.put(f"k{i}", b"v")
    faulty.fail_list_after(2)
    seen: list[str] = []
    with pytest.raises(StorageUnavailable, match="after 2"):
        async for info in faulty.list():
            seen.append(info.name)  # noqa: PERF401 -- a comprehension would lose them on error
    assert seen == ["k0", "k1"]
    assert len([i async for i in faulty.list()]) == 5


async def test_faulty_range_reads_are_gets(faulty: FaultyStorage) -> None:
    await faulty.put("seg", b"0123456789")
    assert await faulty.get_range("seg", 2, 3) == b"234"
    faulty.fail_next(1, "get")
    with pytest.raises(StorageUnavailable, match="injected failure: get 'seg'"):
        await faulty.get_range("seg", 0, 1)
    faulty.reject = lambda name: name == "seg"
    with pytest.raises(ObjectRejected, match="'seg'"):
        await faulty.get_range("seg", -1, 1)
    faulty.reject = None
    faulty.down = True
    with pytest.raises(StorageUnavailable, match="outage"):
        await faulty.get_range("seg", 0, 1)
    faulty.down = False
    faulty.hang("get")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(faulty.get_range, "seg", 0, 1)
            await faulty.wait_hanging("get")
            faulty.release("get")
    assert faulty.calls["get"] == 5
    assert faulty.failures["get"] == 3
