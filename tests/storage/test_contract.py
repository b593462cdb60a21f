"""The storage contract: every backend must pass every test here.

Backends: memory, the filesystem (a tmp folder), and S3 on a moto server over HTTP.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from rrb_streams.crypt import age
from rrb_streams.errors import ObjectExists, ObjectNotFound
from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.encrypted import AgeStorage
from rrb_streams.storage.fs import FsStorage
from rrb_streams.storage.memory import MemoryStorage
from tests.support.age import AGE_KEYS
from tests.support.moto import S3_SECRET_KEY, moto_storage

pytestmark = pytest.mark.anyio

# Bytewise order of these is not what a naive folder walk gives: '-' (0x2d) < '.' (0x2e)
# < '/' (0x2f) < '0' (0x30), so "x/y/z" sorts between "x/y.z" and "x/y0". U+FFFD is EF BF BD
# in UTF-8 and U+1F600 is F0 9F 98 80, so the emoji sorts last (in UTF-16 it would not).
# No name is both an object and a folder ("a/b" with "a/b/c"): a filesystem cannot hold that.
STRESS_NAMES = [
    "a-c",
    "a/b",
    "a/b.x",
    "a/c/d",
    "a0",
    "x/y-1",
    "x/y.z",
    "x/y/z",
    "x/y/z0",
    "x/y/zz/deep/er",
    "x/y0",
    "x/yy",
    "Z",
    "caf\u00e9",
    "cafe",
    "\ufffd",
    "\U0001f600",
    "db0/ab/" + "ab" * 32 + ".backup",
    "db0/ab/" + "ab" * 32 + "/00001700000000000.backup",
    "db0/ab/" + "ab" * 32 + "/00001700000000001.tombstone",
]


def utf8_sorted(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: n.encode("utf-8"))


@pytest.fixture(params=["memory", "fs", "s3", "age-fs", "age-s3"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Storage]:
    """Build the backend under test; ``small_pages`` forces S3 listing to page every 7 keys.

    ``age-*``: the backend seen through :class:`AgeStorage` with a recipient and its identity:
    every object is stored encrypted, and every call must still keep the contract.
    """
    kind: str = request.param
    if kind.endswith("s3"):
        bucket: str = request.getfixturevalue("s3_bucket")
        endpoint: str = request.getfixturevalue("moto_endpoint")

    def make(*, small_pages: bool = False) -> Storage:
        backend: Storage
        if kind == "memory":
            return MemoryStorage()
        if kind.endswith("fs"):
            backend = FsStorage(tmp_path / "store")
        else:
            backend = moto_storage(
                bucket, endpoint, "some/base/", page_size=7 if small_pages else 1000
            )
        return AgeStorage(backend, AGE_KEYS) if kind.startswith("age") else backend

    return make


def stored_size(storage: Storage, plain: int) -> int:
    """What a listing says an object of ``plain`` bytes takes (encrypted: more)."""
    if not isinstance(storage, AgeStorage):
        return plain
    return len(age.encrypt(bytes(plain), AGE_KEYS.recipients))


@pytest.fixture
async def storage(make_storage: Callable[..., Storage]) -> AsyncIterator[Storage]:
    s = make_storage()
    yield s
    await s.close()


async def listed(storage: Storage, prefix: str = "") -> list[ObjectInfo]:
    return [info async for info in storage.list(prefix)]


async def test_check_succeeds_on_a_usable_location(storage: Storage) -> None:
    await storage.check()


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", bytes(range(256)) * 3, b"\xff" * 10_000, os.urandom(1 << 20)],
    ids=["empty", "nul", "all-bytes", "10k", "1MiB-random"],
)
async def test_put_then_get_round_trips(storage: Storage, data: bytes) -> None:
    await storage.put("dir/obj", data)
    assert await storage.get("dir/obj") == data
    assert await listed(storage) == [ObjectInfo("dir/obj", stored_size(storage, len(data)))]


async def test_put_replaces_the_previous_object(storage: Storage) -> None:
    await storage.put("k", b"old value, longer")
    await storage.put("k", b"new")
    assert await storage.get("k") == b"new"
    assert await listed(storage) == [ObjectInfo("k", stored_size(storage, 3))]


async def test_put_is_idempotent(storage: Storage) -> None:
    for _ in range(3):
        await storage.put("k", b"same")
    assert await storage.get("k") == b"same"
    assert await listed(storage) == [ObjectInfo("k", stored_size(storage, 4))]


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "./a", "a/", "nul\x00"])
async def test_put_refuses_invalid_names(storage: Storage, name: str) -> None:
    with pytest.raises(ValueError, match="invalid object name"):
        await storage.put(name, b"x")


async def test_get_of_a_missing_object_names_it(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match="no/such/object"):
        await storage.get("no/such/object")


async def test_get_after_delete_raises_object_not_found(storage: Storage) -> None:
    await storage.put("gone", b"x")
    await storage.delete("gone")
    with pytest.raises(ObjectNotFound, match="gone"):
        await storage.get("gone")


async def test_get_many_returns_objects_in_order_and_missing_ones_in_place(
    storage: Storage,
) -> None:
    big = os.urandom(200_000)  # longer than one read of the filesystem backend
    await storage.put("m/b", b"second")
    await storage.put("m/a", b"first")
    await storage.put("m/big", big)
    await storage.put("m/empty", b"")
    got = await storage.get_many(["m/b", "m/missing", "m/a", "m/big", "m/empty"])
    assert got[0] == b"second"
    assert isinstance(got[1], ObjectNotFound) and "m/missing" in str(got[1])
    assert got[2:] == [b"first", big, b""]
    assert await storage.get_many([]) == []


RANGED = bytes(range(256)) * 4  # 1,024 bytes: every byte value, each at known offsets


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (0, 10, RANGED[:10]),
        (100, 50, RANGED[100:150]),
        (1023, 1, RANGED[1023:]),
        (1000, 100, RANGED[1000:]),
        (0, 1024, RANGED),
        (0, 1 << 40, RANGED),
        (1024, 1, b""),
        (1024, 100, b""),
        (5000, 10, b""),
        (-10, 10, RANGED[-10:]),
        (-1, 1, RANGED[-1:]),
        (-1024, 1024, RANGED),
        (-5000, 5000, RANGED),
        (-10, 4, RANGED[-10:-6]),
        (-5000, 10, RANGED[:10]),
    ],
    ids=[
        "head",
        "middle",
        "last-byte",
        "past-the-end-is-short",
        "exactly-all",
        "huge-length",
        "start-at-the-end",
        "start-at-the-end-long",
        "start-past-the-end",
        "tail",
        "tail-one",
        "tail-exactly-all",
        "tail-longer-than-the-object",
        "tail-then-fewer",
        "tail-longer-then-fewer",
    ],
)
async def test_get_range_returns_the_bytes_asked_for(
    storage: Storage, start: int, length: int, expected: bytes
) -> None:
    await storage.put("seg/1", RANGED)
    assert await storage.get_range("seg/1", start, length) == expected


async def test_get_range_of_an_empty_object_is_empty(storage: Storage) -> None:
    await storage.put("seg/empty", b"")
    for start in (0, 1, -1, -100):
        assert await storage.get_range("seg/empty", start, 10) == b""


async def test_get_range_returns_binary_content_exactly(storage: Storage) -> None:
    # Past the filesystem's first read size and across its read chunks.
    data = os.urandom((1 << 20) + 12_345)
    await storage.put("seg/big", data)
    for start, length in [(0, 70_000), (65_535, 3), (500_000, 600_000), (len(data) - 7, 7)]:
        assert await storage.get_range("seg/big", start, length) == data[start : start + length]
    index = await storage.get_range("seg/big", -100_000, 100_000)
    assert index == data[-100_000:]


async def test_get_range_reads_the_current_object(storage: Storage) -> None:
    await storage.put("seg/1", b"old value, long")
    await storage.put("seg/1", b"new")
    assert await storage.get_range("seg/1", 0, 100) == b"new"
    assert await storage.get_range("seg/1", -100, 100) == b"new"
    assert await storage.get_range("seg/1", 3, 100) == b""


@pytest.mark.parametrize("size", [0, 1, 1000, 65_535, 65_536, 65_537, 200_000, (1 << 20) + 12_345])
async def test_get_tail_returns_the_last_bytes_and_the_size(storage: Storage, size: int) -> None:
    data = os.urandom(size)
    await storage.put("seg/t", data)
    for length in (1, 100, 65_536, 70_000, 5_000_000):
        assert await storage.get_tail("seg/t", length) == (data[-length:], size), length


async def test_get_tail_of_a_missing_object_names_it(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match="no/such/segment"):
        await storage.get_tail("no/such/segment", 10)
    with pytest.raises(ValueError, match="length must be > 0"):
        await storage.get_tail("no/such/segment", 0)


@pytest.mark.parametrize("start", [0, 10, -10])
async def test_get_range_of_a_missing_object_names_it(storage: Storage, start: int) -> None:
    with pytest.raises(ObjectNotFound, match="no/such/segment"):
        await storage.get_range("no/such/segment", start, 10)
    await storage.put("gone", b"x")
    await storage.delete("gone")
    with pytest.raises(ObjectNotFound, match="gone"):
        await storage.get_range("gone", start, 10)


@pytest.mark.parametrize("length", [0, -1, -10])
async def test_get_range_refuses_a_length_below_one(storage: Storage, length: int) -> None:
    await storage.put("seg/1", RANGED)
    for name, start in [("seg/1", 0), ("seg/1", -10), ("missing", 0)]:
        with pytest.raises(ValueError, match="length must be > 0"):
            await storage.get_range(name, start, length)


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "./a", "a/", "nul\x00"])
async def test_get_range_refuses_invalid_names(storage: Storage, name: str) -> None:
    with pytest.raises(ValueError, match="invalid object name"):
        await storage.get_range(name, 0, 1)


async def test_delete_is_idempotent(storage: Storage) -> None:
    await storage.put("a/b", b"x")
    await storage.put("a/c", b"y")
    await storage.delete("a/b")
    await storage.delete("a/b")
    await storage.delete("never/existed")
    assert await listed(storage) == [ObjectInfo("a/c", stored_size(storage, 1))]


async def test_list_yields_names_in_bytewise_utf8_order(storage: Storage) -> None:
    for i, name in enumerate(reversed(STRESS_NAMES)):
        await storage.put(name, b"v" * i)
    got = await listed(storage)
    assert [i.name for i in got] == utf8_sorted(STRESS_NAMES)
    sizes = {name: i for i, name in enumerate(reversed(STRESS_NAMES))}
    assert all(info.size == stored_size(storage, sizes[info.name]) for info in got)


@pytest.mark.parametrize(
    "prefix",
    ["", "a", "a/", "a/b", "x/y", "x/y/", "x/y/z", "x/y-", "x/y0", "x/yy/", "caf", "db0/ab/", "q"],
)
async def test_list_yields_exactly_the_names_with_the_prefix(storage: Storage, prefix: str) -> None:
    async with anyio.create_task_group() as tg:
        for name in STRESS_NAMES:
            tg.start_soon(storage.put, name, b"v")
    expected = utf8_sorted([n for n in STRESS_NAMES if n.startswith(prefix)])
    assert [i.name for i in await listed(storage, prefix)] == expected


async def test_list_of_an_empty_location_yields_nothing(storage: Storage) -> None:
    assert await listed(storage) == []
    assert await listed(storage, "db0/") == []


async def test_list_continues_across_pages(make_storage: Callable[..., Storage]) -> None:
    storage = make_storage(small_pages=True)
    try:
        names = [f"p/{i:03d}" for i in range(45)]
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(storage.put, name, b"x")
        await storage.put("q/outside", b"x")
        assert [i.name for i in await listed(storage, "p/")] == names
        assert len(await listed(storage)) == 46
    finally:
        await storage.close()


async def test_list_reflects_deletes_and_overwrites(storage: Storage) -> None:
    for name in ("d/1", "d/2", "d/3"):
        await storage.put(name, b"x")
    await storage.delete("d/2")
    await storage.put("d/3", b"longer")
    assert await listed(storage, "d/") == [
        ObjectInfo("d/1", stored_size(storage, 1)),
        ObjectInfo("d/3", stored_size(storage, 6)),
    ]


async def test_flush_keeps_everything_readable(storage: Storage) -> None:
    await storage.flush()  # before anything was written
    await storage.put("f/1", b"one")
    await storage.put("f/2", b"two")
    await storage.delete("f/2")
    await storage.flush()
    await storage.flush()
    assert await storage.get("f/1") == b"one"
    assert await listed(storage) == [ObjectInfo("f/1", stored_size(storage, 3))]


async def test_close_is_idempotent_and_safe_before_use(
    make_storage: Callable[..., Storage],
) -> None:
    unused = make_storage()
    await unused.close()
    await unused.close()
    used = make_storage()
    await used.put("k", b"v")
    await used.close()
    await used.close()


async def test_concurrent_puts_all_land(storage: Storage) -> None:
    names = [f"db0/{i % 7:02x}/{i:04d}.backup" for i in range(80)]
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(storage.put, name, name.encode())
    await storage.flush()
    assert [i.name for i in await listed(storage)] == utf8_sorted(names)
    for name in names[::9]:
        assert await storage.get(name) == name.encode()


async def test_concurrent_puts_and_deletes_of_one_folder_never_fail(storage: Storage) -> None:
    # On the filesystem a delete prunes the folder a racing put is about to write into.
    async def churn(i: int) -> None:
        for _ in range(10):
            await storage.put(f"hot/{i}", b"x")
            await storage.delete(f"hot/{i}")

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(churn, i)
    assert await listed(storage) == []


async def test_description_is_a_safe_location(storage: Storage) -> None:
    assert storage.description.split("://")[0] in ("memory", "file", "s3")
    assert S3_SECRET_KEY not in storage.description
    assert S3_SECRET_KEY not in repr(storage)


# --- put_stream ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [[], [b""], [b"one"], [b"a", b"", b"bc", os.urandom(300_000)]],
    ids=["none", "empty", "one", "several"],
)
async def test_put_stream_stores_the_chunks_joined(storage: Storage, chunks: list[bytes]) -> None:
    await storage.put_stream("dir/obj", iter(chunks))
    await storage.flush()
    data = b"".join(chunks)
    assert await storage.get("dir/obj") == data
    assert await listed(storage) == [ObjectInfo("dir/obj", stored_size(storage, len(data)))]


async def test_put_stream_iterates_the_chunks_once_and_off_the_event_loop(
    storage: Storage,
) -> None:
    """The chunks may do blocking work (compression): they run in a worker thread."""
    import threading

    loop_thread = threading.get_ident()
    threads: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(3):
            threads.append(threading.get_ident())
            yield b"%d" % i

    await storage.put_stream("k", chunks())
    assert await storage.get("k") == b"012"
    assert len(threads) == 3
    assert loop_thread not in threads


async def test_put_stream_whose_chunks_fail_leaves_no_object(storage: Storage) -> None:
    await storage.put("keep", b"old")

    def chunks() -> Iterator[bytes]:
        yield b"first part"
        raise ValueError("the encoder gave up")

    for name in ("keep", "new"):
        with pytest.raises(ValueError, match="the encoder gave up"):
            await storage.put_stream(name, chunks())
    assert await storage.get("keep") == b"old"
    with pytest.raises(ObjectNotFound):
        await storage.get("new")
    assert [i.name for i in await listed(storage)] == ["keep"]


async def test_put_stream_refuses_invalid_names(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.put_stream("../x", iter([b"v"]))


async def test_put_new_creates_a_name_once(storage: Storage) -> None:
    await storage.put_new("m/00001.json", b"first")
    with pytest.raises(ObjectExists, match=r"00001\.json"):
        await storage.put_new("m/00001.json", b"second")
    await storage.flush()
    assert await storage.get("m/00001.json") == b"first"
    assert [i.name for i in await listed(storage, "m/")] == ["m/00001.json"]


async def test_put_new_of_many_writers_lets_exactly_one_win(storage: Storage) -> None:
    won: list[int] = []

    async def one(i: int) -> None:
        try:
            await storage.put_new("race", b"writer %d" % i)
        except ObjectExists:
            return
        won.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert len(won) == 1
    assert await storage.get("race") == b"writer %d" % won[0]
    # No temporary file of a losing writer is left behind or listed.
    assert [i.name for i in await listed(storage)] == ["race"]


async def test_put_new_refuses_invalid_names(storage: Storage) -> None:
    with pytest.raises(ValueError, match="invalid object name"):
        await storage.put_new("../x", b"")
