"""The local filesystem as storage: one file per object below a root folder.

A put writes a temporary file next to the target (``.{name}.{32 hex digits}.tmp``, never
listed) and renames it over the target, so readers see the old object or the new one, never a
part. A put is made durable by :meth:`FsStorage.flush`, not by itself: on Linux one
``syncfs(2)`` of the root's filesystem commits a whole batch in one journal commit, several
times faster than an ``fsync`` per file. Elsewhere the files and folders changed since the last
flush are fsynced.

Blocking calls run in worker threads, at most ``max_threads`` at a time. Puts that wait at the
same time share a thread: one trip to a worker thread writes every put queued by then, because
that trip costs about as much as writing a small file. A new trip starts only while none is on
its way to a thread, so a slow disk still gets up to ``max_threads`` writes at once.

``OSError`` is translated like this:

=================================================  ======================================
ENOENT, ENOTDIR, EISDIR on get (and get_range)     ``ObjectNotFound``
EACCES, EPERM, EROFS                               ``DependencyError``: the folder refuses
                                                   us and only an operator can fix that
ENOSPC, EDQUOT, EIO and anything else              ``StorageUnavailable``: space can be
                                                   freed; the same call then succeeds
ENAMETOOLONG, a name that collides with a folder   ``ObjectRejected``
or with an object where a folder is needed
=================================================  ======================================

A filesystem cannot hold both ``a/b`` and ``a/b/c``: the second put is ``ObjectRejected``.
Object names from :mod:`rrb_streams.format.layout` never collide that way.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import secrets
import stat
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from rrb_streams.errors import (
    DependencyError,
    ObjectExists,
    ObjectNotFound,
    ObjectRejected,
    RrbError,
    StorageUnavailable,
)
from rrb_streams.storage.base import Fetched, ObjectInfo, Storage, check_name, check_range

T = TypeVar("T")
_READ_CHUNK = 1 << 20
# Small enough to come from the heap (a larger buffer is an mmap and munmap per read), large
# enough for most objects in one call.
_FIRST_READ = 1 << 16

_TEMP = re.compile(r"^\..*\.[0-9a-f]{32}\.tmp$", re.DOTALL)
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_BAD_NAME = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST})
_MKDIR_RETRIES = 5
_PUTS_PER_TRIP = 64  # a trip returns after this many puts, so no caller waits on a long queue

_Entry = tuple[str, bool, int]  # name ("/"-terminated for a folder), is a folder, size
# FsStorage.list shadows the builtin inside the class body.
_Entries = list[_Entry]
_Paths = list[Path]


@dataclass(eq=False, slots=True)
class _Put:
    """One put: queued, then taken by a worker thread, then done."""

    name: str
    data: bytes | Iterable[bytes]  # an iterable: put_stream's chunks
    exclusive: bool = False  # put_new: fail rather than replace
    taken: bool = False
    done: bool = False
    error: BaseException | None = None
    changed: _Paths = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Trip:
    started: bool = False  # its thread began taking puts


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


def _is_temp(filename: str) -> bool:
    return _TEMP.match(filename) is not None


def _sort_key(entry: _Entry) -> bytes:
    return entry[0].encode("utf-8", "surrogateescape")


class FsStorage:
    """Objects as files below ``root``, which is created by the first put if missing.

    Knobs: ``max_threads`` bounds the worker threads doing blocking I/O; ``use_syncfs``
    (default: when the platform has it) selects ``syncfs(2)`` for :meth:`flush`, else the
    portable fallback which remembers up to ``max_tracked`` changed paths and syncs early,
    inside ``put``, when more pile up.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_threads: int = 8,
        use_syncfs: bool | None = None,
        max_tracked: int = 10_000,
    ) -> None:
        self.root = Path(root).absolute()
        self._root_text = str(self.root).rstrip("/")
        # Temporary names: unique across processes by the tag, within one by the count.
        self._temp_tag = secrets.token_hex(8)
        self._temp_count = itertools.count()
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._max_threads = max_threads
        self._queue: deque[_Put] = deque()
        self._queue_lock = threading.Lock()  # the queue and the puts' states, across threads
        self._trips = 0  # trips to worker threads writing queued puts
        self._starting = 0  # those whose thread has not begun yet (under _queue_lock)
        self._progress: anyio.Event | None = None  # set when a trip ends
        syncfs = _load_syncfs() if use_syncfs is not False else None
        if use_syncfs and syncfs is None:
            raise ValueError("syncfs(2) is not available on this platform")
        self._syncfs = syncfs
        self._dirty: set[Path] = set()
        self._max_tracked = max_tracked
        self._sync_lock = anyio.Lock()

    @property
    def description(self) -> str:
        """``file:///absolute/root``."""
        return f"file://{self.root}"

    def __repr__(self) -> str:
        return f"FsStorage({str(self.root)!r})"

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # -- check ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Raise ``DependencyError`` naming the folder unless it is a readable, writable folder,
        or is missing while its parent is a writable folder (the first put creates it).
        Creates nothing."""
        await self._run(self._check)

    def _check(self) -> None:
        root = self.root
        if root.exists():
            if not root.is_dir():
                raise DependencyError(f"storage folder {root} is not a folder")
            if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
                raise DependencyError(f"storage folder {root} is not readable and writable")
            try:
                with os.scandir(root) as entries:
                    next(entries, None)
            except OSError as exc:
                raise DependencyError(
                    f"storage folder {root} cannot be read: {exc.strerror}"
                ) from exc
            return
        parent = root.parent
        if not parent.exists():
            raise DependencyError(
                f"storage folder {root} cannot be created: {parent} does not exist"
            )
        if not parent.is_dir():
            raise DependencyError(
                f"storage folder {root} cannot be created: {parent} is not a folder"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DependencyError(
                f"storage folder {root} cannot be created: {parent} is not writable"
            )

    # -- put --------------------------------------------------------------------------------

    async def put(self, name: str, data: bytes) -> None:
        """Write to a temporary file beside the target, then rename it over the target.

        Creates missing folders. Durable after the next :meth:`flush`.
        """
        await self._put(name, data)

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        """:meth:`put` of ``chunks`` written one by one, in the worker thread that writes the
        file."""
        await self._put(name, chunks)

    async def put_new(self, name: str, data: bytes) -> None:
        """:meth:`put` through a hard link instead of a rename: it fails when the name exists."""
        await self._put(name, data, exclusive=True)

    async def _put(self, name: str, data: bytes | Iterable[bytes], exclusive: bool = False) -> None:
        check_name(name)
        if _is_temp(name.rpartition("/")[2]):
            raise ObjectRejected(f"{name!r}: the name looks like a temporary file")
        put = _Put(name, data, exclusive)
        self._queue.append(put)
        try:
            while not put.done:
                if self._trips < self._max_threads and not self._starting:
                    await self._trip()
                else:
                    await self._progress_event().wait()
        except BaseException:
            await self._abandon(put)
            raise
        if put.error is not None:
            raise put.error
        await self._track(put.changed)

    async def _trip(self) -> None:
        """Write queued puts in a worker thread."""
        trip = _Trip()
        self._trips += 1
        with self._queue_lock:
            self._starting += 1
        try:
            await self._run(self._write_queued, trip)
        finally:
            with self._queue_lock:
                if not trip.started:  # cancelled before its thread began
                    self._starting -= 1
            self._trips -= 1
            progress, self._progress = self._progress, None
            if progress is not None:
                progress.set()

    def _progress_event(self) -> anyio.Event:
        if self._progress is None:
            self._progress = anyio.Event()
        return self._progress

    async def _abandon(self, put: _Put) -> None:
        """Withdraw a put whose caller gives up, or wait until its thread wrote it: a put that
        has returned, even by cancellation, never lands afterwards."""
        with self._queue_lock:
            if not put.taken:
                self._queue.remove(put)
                return
        with anyio.CancelScope(shield=True):
            while not put.done:
                await self._progress_event().wait()

    def _write_queued(self, trip: _Trip) -> None:
        with self._queue_lock:
            trip.started = True
            self._starting -= 1
        for _ in range(_PUTS_PER_TRIP):
            with self._queue_lock:
                if not self._queue:
                    return
                put = self._queue.popleft()
                put.taken = True
            try:
                put.changed = self._write(put.name, put.data, put.exclusive)
            except BaseException as exc:
                put.error = exc
                if not isinstance(exc, Exception):
                    raise
            finally:
                put.done = True

    def _write(self, name: str, data: bytes | Iterable[bytes], exclusive: bool) -> _Paths:
        # Paths as text: pathlib's parsing cost as much as the system calls of a small file.
        path = f"{self._root_text}/{name}"
        folder, _, filename = path.rpartition("/")
        for attempt in range(_MKDIR_RETRIES):
            tmp = f"{folder}/.{filename}.{self._temp_tag}{next(self._temp_count):016x}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileNotFoundError as exc:
                # Missing folders, or delete() pruned the empty folder we had just made.
                if attempt == _MKDIR_RETRIES - 1:
                    raise self._error(exc, name, "write") from exc
                self._make_folders(Path(folder), name)
            except (OSError, UnicodeEncodeError) as exc:
                raise self._put_error(exc, name) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:  # put_stream: one chunk in memory at a time
                    for chunk in data:
                        f.write(chunk)
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExists(f"{name!r} exists in {self.description}") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise self._put_error(exc, name) from exc
            raise
        return [] if self._syncfs is not None else [Path(path), *self._folders_of(Path(path))]

    def _make_folders(self, folder: Path, name: str) -> None:
        """Create the root (never its parents: check() demands those exist) and ``folder``."""
        try:
            self.root.mkdir(exist_ok=True)
        except FileExistsError as exc:
            raise DependencyError(f"storage folder {self.root} is not a folder") from exc
        except OSError as exc:
            raise DependencyError(
                f"storage folder {self.root} cannot be created: {exc.strerror}"
            ) from exc
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:
            pass  # a racing delete() pruned part of it: the caller tries again
        except OSError as exc:
            raise self._put_error(exc, name) from exc

    def _put_error(self, exc: OSError | UnicodeEncodeError, name: str) -> RrbError:
        if isinstance(exc, UnicodeEncodeError):
            return ObjectRejected(f"{name!r} cannot be a file name here: {exc}")
        if exc.errno in (errno.ENOTDIR, errno.EEXIST) and not self.root.is_dir():
            return DependencyError(
                f"storage folder {self.root} cannot be created: {exc.strerror}: {exc.filename}"
            )
        return self._error(exc, name, "write")

    def _folders_of(self, path: Path) -> Iterable[Path]:
        """Folders whose entries a change to ``path`` may have touched, up to the root's parent."""
        folder = path.parent
        while folder != self.root:
            yield folder
            folder = folder.parent
        yield self.root
        yield self.root.parent

    # -- get --------------------------------------------------------------------------------

    async def get(self, name: str) -> bytes:
        """Return the file's bytes; ``ObjectNotFound`` naming it when absent."""
        check_name(name)
        return await self._run(self._read, name)

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start`` (from the end when negative) in a worker
        thread; ``ObjectNotFound`` naming it when absent."""
        return (await self._ranged(name, start, length))[0]

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        return await self._ranged(name, -length, length)  # and the file's size

    async def _ranged(self, name: str, start: int, length: int) -> tuple[bytes, int]:
        check_range(name, length)
        return await self._run(self._read_range, name, start, length)

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        """Read the files in one trip to a worker thread: a trip costs more than a small read."""
        for name in names:
            check_name(name)
        return await self._run(self._read_many, names)

    def _read_many(self, names: Sequence[str]) -> list[Fetched]:
        out: list[Fetched] = []
        for name in names:
            try:
                out.append(self._read(name))
            except ObjectNotFound as exc:
                out.append(exc)
        return out

    def _read(self, name: str) -> bytes:
        try:
            # os.open/os.read: a third of pathlib's cost per small file, which a restore of
            # millions of small objects feels.
            fd = os.open(f"{self._root_text}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunk = os.read(fd, _FIRST_READ)
                if len(chunk) < _FIRST_READ:
                    return chunk  # a short read of a regular file is its end
                chunks = [chunk]
                while chunk := os.read(fd, _READ_CHUNK):
                    chunks.append(chunk)
            finally:
                os.close(fd)
            return b"".join(chunks)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object named {name!r} in {self.description}") from exc
        except OSError as exc:
            raise self._error(exc, name, "read") from exc

    def _read_range(self, name: str, start: int, length: int) -> tuple[bytes, int]:
        try:
            fd = os.open(f"{self._root_text}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The size bounds the read (a caller may ask for "up to length") and places
                # a negative start. A put renames a new file over this one: ours stays whole.
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
                start = max(0, info.st_size + start) if start < 0 else start
                # One pread: a regular file gives all it has up to 2 GiB (ranges are MiBs).
                data = os.pread(fd, max(0, min(length, info.st_size - start)), start)
            finally:
                os.close(fd)
            return data, info.st_size
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object named {name!r} in {self.description}") from exc
        except OSError as exc:
            raise self._error(exc, name, "read") from exc

    # -- list -------------------------------------------------------------------------------

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Walk folders lazily, depth first, in exact bytewise order of the full names.

        Each folder's entries sort as ``name/`` for a folder and ``name`` for a file, which
        orders them as their descendants' full names sort (``a-c`` < ``a/b`` < ``a0``).
        Only folders that can hold names starting with ``prefix`` are read; memory holds one
        folder listing per level.
        """
        start = prefix.rpartition("/")[0]
        start = start + "/" if start else ""
        first = await self._run(self._scan, start)
        if first is None:
            return
        stack = [(start, iter(first))]
        while stack:
            folder, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, is_dir, size = entry
            full = folder + name
            if is_dir:
                if full.startswith(prefix) or prefix.startswith(full):
                    sub = await self._run(self._scan, full)
                    if sub:
                        stack.append((full, iter(sub)))
            elif full.startswith(prefix):
                yield ObjectInfo(full, size)

    def _scan(self, folder: str) -> _Entries | None:
        """One folder's entries in listing order; ``None`` when the folder does not exist."""
        found: _Entries = []
        try:
            with os.scandir(self.root / folder if folder else self.root) as it:
                for e in it:
                    if _is_temp(e.name):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        found.append((e.name + "/", True, 0))
                    elif e.is_file(follow_symlinks=False):
                        try:
                            found.append((e.name, False, e.stat(follow_symlinks=False).st_size))
                        except FileNotFoundError:
                            continue  # deleted while we listed
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, folder or None, "list") from exc
        found.sort(key=_sort_key)
        return found

    # -- delete -----------------------------------------------------------------------------

    async def delete(self, name: str) -> None:
        """Remove the file, then every folder it leaves empty up to the root. Idempotent."""
        check_name(name)
        changed = await self._run(self._remove, name)
        await self._track(changed)

    def _remove(self, name: str) -> _Paths:
        path = self.root / name
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as exc:
            raise self._error(exc, name, "delete") from exc
        folder = path.parent
        while folder != self.root:
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or a racing put refilled or removed it): stop pruning
            folder = folder.parent
        return [path.parent, folder] if self._syncfs is None else []

    # -- flush and close --------------------------------------------------------------------

    async def flush(self) -> None:
        """Make every returned put and delete durable.

        ``StorageUnavailable`` if the kernel reports a write-back error: the data may be lost,
        so the caller must write it again.
        """
        if self._syncfs is not None:
            await self._run(self._syncfs_root)
            return
        await self._sync_tracked()

    def _syncfs_root(self) -> None:
        assert self._syncfs is not None
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # nothing was ever written
        except OSError as exc:
            raise self._error(exc, None, "flush") from exc
        try:
            if self._syncfs(fd) != 0:
                code = ctypes.get_errno()
                err = OSError(code, os.strerror(code), str(self.root))
                raise self._error(err, None, "flush") from err
        finally:
            os.close(fd)

    async def _track(self, changed: _Paths) -> None:
        if not changed:
            return
        self._dirty.update(changed)
        if len(self._dirty) >= self._max_tracked:
            await self._sync_tracked()

    async def _sync_tracked(self) -> None:
        # One sync at a time: a flush must not return while another one is still syncing
        # paths that this flush's caller wrote.
        async with self._sync_lock:
            paths, self._dirty = self._dirty, set()
            try:
                await self._run(self._fsync_all, paths)
            except BaseException:
                self._dirty |= paths
                raise

    def _fsync_all(self, paths: set[Path]) -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # deleted since: its folder's sync records that
            except OSError as exc:
                raise self._error(exc, None, "flush") from exc
            try:
                os.fsync(fd)
            except OSError as exc:
                raise self._error(exc, None, "flush") from exc
            finally:
                os.close(fd)

    async def close(self) -> None:
        """Nothing to release: files are closed after each call. Idempotent."""
        await anyio.lowlevel.checkpoint()

    # -- errors -----------------------------------------------------------------------------

    def _error(self, exc: OSError, name: str | None, action: str) -> RrbError:
        what = f"{name!r} in {self.description}" if name else self.description
        reason = f"cannot {action} {what}: {exc.strerror or exc}"
        if exc.errno in _REFUSED:
            return DependencyError(f"storage folder {self.root} refuses access: {reason}")
        if name is not None and exc.errno in _BAD_NAME:
            return ObjectRejected(reason)
        return StorageUnavailable(reason)


_: Storage = FsStorage(Path("rrb-backup"))
