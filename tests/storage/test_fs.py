"""Filesystem backend specifics: atomic writes, durability, folder checks, error mapping."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from rrb_streams.errors import (
    DependencyError,
    ObjectNotFound,
    ObjectRejected,
    StorageUnavailable,
)
from rrb_streams.storage.base import ObjectInfo
from rrb_streams.storage.fs import FsStorage

pytestmark = pytest.mark.anyio

TEMP_NAME = ".obj." + "0" * 32 + ".tmp"


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[FsStorage]:
    s = FsStorage(tmp_path / "store")
    yield s
    await s.close()


def files_below(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every fsync'd file descriptor."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def test_fs_description_is_a_file_url(tmp_path: Path) -> None:
    assert FsStorage(tmp_path / "s").description == f"file://{tmp_path}/s"


async def test_fs_failed_rename_keeps_the_old_object(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("d/obj", b"old")

    def no_space(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StorageUnavailable, match="'d/obj'"):
        await storage.put("d/obj", b"new")
    monkeypatch.undo()
    assert await storage.get("d/obj") == b"old"
    assert files_below(storage.root) == ["d/obj"]


async def test_fs_half_written_file_is_never_visible(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("d/obj", b"old")
    seen_while_writing: list[list[ObjectInfo]] = []
    real_fdopen = os.fdopen

    class HalfThenFull:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> HalfThenFull:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            # Runs in the worker thread: look at the folder as another reader would.
            seen_while_writing.append(anyio.from_thread.run(_listed, storage))
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfThenFull(real_fdopen(fd, mode)))
    with pytest.raises(StorageUnavailable):
        await storage.put("d/obj", b"new value" * 1000)
    monkeypatch.undo()
    assert seen_while_writing == [[ObjectInfo("d/obj", 3)]]
    assert await storage.get("d/obj") == b"old"
    assert files_below(storage.root) == ["d/obj"]


async def _listed(storage: FsStorage, prefix: str = "") -> list[ObjectInfo]:
    return [i async for i in storage.list(prefix)]


async def test_fs_leftover_temp_files_are_not_listed(storage: FsStorage) -> None:
    await storage.put("d/obj", b"v")
    (storage.root / "d" / TEMP_NAME).write_bytes(b"partial")  # as a crash would leave it
    (storage.root / TEMP_NAME).write_bytes(b"partial")
    assert await _listed(storage) == [ObjectInfo("d/obj", 1)]
    assert await storage.get("d/obj") == b"v"


async def test_fs_refuses_names_that_look_like_temp_files(storage: FsStorage) -> None:
    with pytest.raises(ObjectRejected, match="temporary"):
        await storage.put("d/" + TEMP_NAME, b"v")


async def test_fs_readers_see_whole_objects_only(storage: FsStorage) -> None:
    a, b = b"a" * (1 << 20), b"b" * (1 << 21)
    await storage.put("hot", a)
    done = False

    async def writer() -> None:
        nonlocal done
        for _ in range(30):
            await storage.put("hot", b)
            await storage.put("hot", a)
        done = True

    async def reader() -> None:
        reads = 0
        while not done or reads == 0:
            assert await storage.get("hot") in (a, b)
            reads += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(reader)


async def test_fs_large_value_round_trips(storage: FsStorage) -> None:
    data = os.urandom(50 * 1024 * 1024)
    await storage.put("db0/big.backup", data)
    await storage.flush()
    assert await storage.get("db0/big.backup") == data
    assert await _listed(storage) == [ObjectInfo("db0/big.backup", len(data))]


async def test_fs_check_accepts_a_missing_root_in_a_writable_folder(tmp_path: Path) -> None:
    storage = FsStorage(tmp_path / "new")
    await storage.check()
    assert not (tmp_path / "new").exists()
    await storage.put("x", b"v")
    assert (tmp_path / "new" / "x").read_bytes() == b"v"
    await storage.check()


async def test_fs_check_names_a_root_whose_parent_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "missing" / "store"
    with pytest.raises(DependencyError, match=f"{root}.*{tmp_path / 'missing'} does not exist"):
        await FsStorage(root).check()


async def test_fs_check_names_a_root_below_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    root = tmp_path / "file" / "store"
    with pytest.raises(DependencyError, match=f"{root}.*is not a folder"):
        await FsStorage(root).check()


async def test_fs_check_names_a_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DependencyError, match=f"{tmp_path / 'file'} is not a folder"):
        await FsStorage(tmp_path / "file").check()


async def test_fs_put_into_an_impossible_root_is_a_dependency_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    for root in (tmp_path / "file", tmp_path / "file" / "store", tmp_path / "no" / "store"):
        with pytest.raises(DependencyError, match=str(root)):
            await FsStorage(root).put("d/x", b"v")
    assert not (tmp_path / "no").exists()  # the root's parents are never created


async def test_fs_object_where_a_folder_is_needed_is_rejected(storage: FsStorage) -> None:
    await storage.put("a/b", b"object")
    with pytest.raises(ObjectRejected, match="'a/b/c'"):
        await storage.put("a/b/c", b"v")
    await storage.put("x/y/z", b"v")
    with pytest.raises(ObjectRejected, match="'x/y'"):
        await storage.put("x/y", b"v")
    with pytest.raises(ObjectNotFound, match="'x/y'"):
        await storage.get("x/y")
    with pytest.raises(ObjectNotFound, match="'a/b/c'"):
        await storage.get("a/b/c")
    for start in (0, 1 << 20, -1):  # a folder is not found, wherever the range starts
        with pytest.raises(ObjectNotFound, match="'x/y'"):
            await storage.get_range("x/y", start, 1)
    with pytest.raises(ObjectNotFound, match="'a/b/c'"):
        await storage.get_range("a/b/c", 0, 1)
    await storage.delete("x/y")  # a folder is not an object: nothing to delete
    await storage.delete("a/b/c")
    assert [i.name for i in await _listed(storage)] == ["a/b", "x/y/z"]


async def test_fs_delete_removes_emptied_folders_up_to_the_root(storage: FsStorage) -> None:
    await storage.put("db0/ab/key/1.backup", b"v")
    await storage.put("db0/cd/other.backup", b"v")
    await storage.delete("db0/ab/key/1.backup")
    assert not (storage.root / "db0" / "ab").exists()
    assert (storage.root / "db0" / "cd").is_dir()
    await storage.delete("db0/cd/other.backup")
    assert storage.root.is_dir()
    assert list(storage.root.iterdir()) == []


async def test_fs_list_reads_only_folders_that_can_match(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("db0/ab/1", "db0/cd/2", "db1/ab/3", "dz"):
        await storage.put(name, b"v")
    scanned: list[str] = []
    real = os.scandir

    def scandir(path: Any) -> Any:
        scanned.append(str(Path(path).relative_to(storage.root)))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert [i.name for i in await _listed(storage, "db0/ab/")] == ["db0/ab/1"]
    assert scanned == ["db0/ab"]
    scanned.clear()
    assert [i.name for i in await _listed(storage, "db0")] == ["db0/ab/1", "db0/cd/2"]
    assert scanned == [".", "db0", "db0/ab", "db0/cd"]
    scanned.clear()
    assert await _listed(storage, "db2/") == []
    assert scanned == ["db2"]


async def test_fs_flush_commits_with_one_syncfs_of_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsStorage(tmp_path / "store", use_syncfs=True)
    await storage.flush()  # nothing written yet: no root, nothing to do
    calls: list[str] = []
    real = storage._syncfs
    assert real is not None

    def syncfs(fd: int) -> int:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(storage, "_syncfs", syncfs)
    synced = record_fsyncs(monkeypatch)
    for i in range(20):
        await storage.put(f"db0/{i:02x}/k", b"v")
    assert calls == []
    await storage.flush()
    assert calls == [str(storage.root)]
    assert synced == []


async def test_fs_flush_reports_writeback_errors_as_transient(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("k", b"v")

    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(storage, "_syncfs", failing_syncfs)
    with pytest.raises(StorageUnavailable, match="flush"):
        await storage.flush()


async def test_fs_fallback_flush_fsyncs_files_and_their_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsStorage(tmp_path / "store", use_syncfs=False)
    synced = record_fsyncs(monkeypatch)
    root = storage.root
    await storage.put("a/b/c", b"v")
    await storage.put("a/d", b"v")
    await storage.put("gone", b"v")
    await storage.delete("gone")
    assert synced == []
    await storage.flush()
    assert sorted(synced) == sorted(
        str(p) for p in (root / "a/b/c", root / "a/d", root / "a/b", root / "a", root, tmp_path)
    )
    synced.clear()
    await storage.flush()
    assert synced == []
    await storage.delete("a/d")
    await storage.flush()
    assert synced == [str(root / "a")]


async def test_fs_fallback_syncs_early_when_many_paths_pile_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsStorage(tmp_path / "store", use_syncfs=False, max_tracked=10)
    synced = record_fsyncs(monkeypatch)
    for i in range(30):
        await storage.put(f"k{i:02d}", b"v")
    assert len(synced) >= 20  # synced inside put, with no flush yet
    await storage.flush()
    assert {str(storage.root / f"k{i:02d}") for i in range(30)} <= set(synced)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, StorageUnavailable),
        (errno.EDQUOT, StorageUnavailable),
        (errno.EIO, StorageUnavailable),
        (errno.EROFS, DependencyError),
        (errno.EACCES, DependencyError),
        (errno.EPERM, DependencyError),
        (errno.ENAMETOOLONG, ObjectRejected),
    ],
)
async def test_fs_os_errors_are_translated(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[Exception]
) -> None:
    await storage.put("d/x", b"v")
    real = os.open

    def failing_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(storage.root)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(expected, match="'d/x'") as info:
        await storage.put("d/x", b"new")
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert await storage.get("d/x") == b"v"


async def test_fs_get_of_an_unreadable_object_is_not_not_found(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("d/x", b"v")

    def eio(fd: int, size: int, offset: int = 0) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "read", eio)
    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(StorageUnavailable, match="'d/x'"):
        await storage.get("d/x")
    with pytest.raises(StorageUnavailable, match="'d/x'"):
        await storage.get_many(["d/x"])
    with pytest.raises(StorageUnavailable, match="'d/x'"):
        await storage.get_range("d/x", 0, 1)
    with pytest.raises(StorageUnavailable, match="'d/x'"):
        await storage.get_tail("d/x", 1)


async def test_fs_refuses_names_escaping_the_root(storage: FsStorage) -> None:
    for name in ("../outside", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="invalid object name"):
            await storage.get(name)
        with pytest.raises(ValueError, match="invalid object name"):
            await storage.delete(name)
        with pytest.raises(ValueError, match="invalid object name"):
            await storage.get_range(name, 0, 1)


def block_write_of(
    storage: FsStorage, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[threading.Event, threading.Event]:
    """Make the worker thread stop inside the write of ``name`` until ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    real = storage._write

    def write(n: str, data: bytes, exclusive: bool) -> Any:
        if n == name:
            entered.set()
            release.wait(10)
        return real(n, data, exclusive)

    monkeypatch.setattr(storage, "_write", write)
    return entered, release


async def test_fs_puts_waiting_together_each_get_their_own_outcome(storage: FsStorage) -> None:
    await storage.put("a/b", b"object")
    outcomes: dict[str, str] = {}

    async def put(name: str) -> None:
        try:
            await storage.put(name, name.encode())
            outcomes[name] = "ok"
        except ObjectRejected:
            outcomes[name] = "rejected"

    names = [f"k/{i}" for i in range(40)] + [f"a/b/{i}" for i in range(5)]
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(put, name)
    assert outcomes == {n: "rejected" if n.startswith("a/b/") else "ok" for n in names}
    for i in range(40):
        assert await storage.get(f"k/{i}") == f"k/{i}".encode()


async def test_fs_cancelled_queued_put_never_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsStorage(tmp_path / "store", max_threads=1)
    entered, release = block_write_of(storage, monkeypatch, "first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(storage.put, "first", b"1")
        await anyio.to_thread.run_sync(entered.wait, 5)  # the only thread is busy
        with anyio.move_on_after(0.1):
            await storage.put("queued", b"2")  # waits for the thread, then gives up
        release.set()
    await storage.put("after", b"3")
    assert files_below(storage.root) == ["after", "first"]


async def test_fs_cancelled_put_that_a_thread_took_returns_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsStorage(tmp_path / "store", max_threads=1)
    first, release_first = block_write_of(storage, monkeypatch, "first")
    taken, release_taken = block_write_of(storage, monkeypatch, "taken")
    returned = anyio.Event()

    async def put_then_cancel(scope: anyio.CancelScope) -> None:
        with scope:
            await storage.put("taken", b"v")
        returned.set()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(storage.put, "first", b"1")
        await anyio.to_thread.run_sync(first.wait, 5)
        tg.start_soon(put_then_cancel, scope)  # queued behind "first", in the same thread
        await anyio.sleep(0.05)
        release_first.set()
        await anyio.to_thread.run_sync(taken.wait, 5)
        scope.cancel()
        await anyio.sleep(0.1)
        assert not returned.is_set()  # a put that returned must never land afterwards
        release_taken.set()
    assert returned.is_set() and files_below(storage.root) == ["first", "taken"]
