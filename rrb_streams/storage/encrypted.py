"""A storage that encrypts what it writes and decrypts what it reads, with age.

:class:`AgeStorage` wraps any backend. Everything above it (formats, uploaders, restore,
compaction) sees plaintext; everything below it holds age files (:mod:`rrb_streams.crypt.age`).

- **Writes** are encrypted to every recipient when there are recipients, and stored as they
  are when there are none.
- **Reads** decrypt an object when it is an age file and return it as it is otherwise, so a
  backup that turned encryption on midway reads whole, and compaction re-encrypts the old
  objects as it rewrites them.
- **Ranged reads** of an encrypted object fetch only the 64 KiB chunks that hold the range.
  The first read of an object fetches its header to unwrap the file key (kept for the next
  reads, a few thousand objects at most), so a block of a large segment costs its own bytes
  plus one small GET, not the segment.
- Sizes in :meth:`list` are the stored (encrypted) sizes: what the bucket holds and bills.
  :meth:`get_tail` reports the plaintext size, which block indexes are checked against.

Without identities, an encrypted object's read raises ``NotDecryptable`` naming it; a wrong
identity raises the same; a tampered one raises ``CorruptObject`` like a bad checksum.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import anyio

from rrb_streams.crypt import age
from rrb_streams.crypt.keys import AgeKeys
from rrb_streams.errors import CorruptObject
from rrb_streams.storage.base import Fetched, ObjectInfo, Storage, check_range

#: Objects whose unwrapped keys are kept: a restore reads a few hundred segments at once.
HEADERS_KEPT = 4096
#: Bytes fetched to read a header: one recipient's header is about 200 bytes.
_HEAD_READ = 1024
#: Decrypting more than this leaves the event loop for a worker thread.
_INLINE = 256 * 1024
_PLAIN = None  # a cached "this object is not encrypted"
T = TypeVar("T")


class AgeStorage:
    """``inner`` seen through age encryption with ``keys``. See the module docstring."""

    def __init__(self, inner: Storage, keys: AgeKeys) -> None:
        self.inner = inner
        self.keys = keys
        self._opened: OrderedDict[str, age.Opened | None] = OrderedDict()
        self._fetching: dict[str, anyio.Event] = {}  # headers being fetched, by object

    def __repr__(self) -> str:
        return (
            f"AgeStorage({self.inner.description!r}, recipients="
            f"{[r.fingerprint for r in self.keys.recipients]}, identities="
            f"{list(self.keys.fingerprints)})"
        )

    @property
    def description(self) -> str:
        return self.inner.description

    async def check(self) -> None:
        await self.inner.check()

    # -- writing ---------------------------------------------------------------------------

    async def put(self, name: str, data: bytes) -> None:
        self._forget(name)
        await self.inner.put(name, await self._sealed(data))

    async def put_new(self, name: str, data: bytes) -> None:
        self._forget(name)
        await self.inner.put_new(name, await self._sealed(data))

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        self._forget(name)
        if self.keys.recipients:
            chunks = age.encrypt_stream(chunks, self.keys.recipients)
        await self.inner.put_stream(name, chunks)

    async def delete(self, name: str) -> None:
        self._forget(name)
        await self.inner.delete(name)

    async def _sealed(self, data: bytes) -> bytes:
        if not self.keys.recipients:
            return data
        return await _run(age.encrypt, len(data), data, self.keys.recipients)

    # -- reading ---------------------------------------------------------------------------

    async def get(self, name: str) -> bytes:
        return await self._opened_whole(name, await self.inner.get(name))

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        out: list[Fetched] = []
        for name, data in zip(names, await self.inner.get_many(names), strict=True):
            if isinstance(data, bytes):
                try:
                    data = await self._opened_whole(name, data)
                except CorruptObject as exc:
                    data = exc  # tampered: this object's reader says so, the rest go on
            out.append(data)
        return out

    async def _opened_whole(self, name: str, data: bytes, *, keep: bool = False) -> bytes:
        """``data``, the whole object, decrypted when it is an age file. ``keep``: keep its
        unwrapped key (a segment, whose blocks are read next; not the many small objects of
        the keys layout, which would push the segments' keys out)."""
        if not age.is_encrypted(data):
            if keep:
                self._keep(name, _PLAIN)
            return data
        opened = age.open_whole(data, self.keys.identities, name)
        if keep:
            self._keep(name, opened)
        return await _run(opened.open_payload, len(data), data)

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        check_range(name, length)
        if not self.keys.identities:
            return await self.inner.get_range(name, start, length)
        if start < 0:
            data, _ = await self.get_tail(name, -start)
            return data[:length]

        async def read(opened: age.Opened | None) -> bytes:
            if opened is None:
                return await self.inner.get_range(name, start, length)
            first, offset, span = opened.span(start, length)
            sealed = await self.inner.get_range(name, offset, span)
            if not sealed:
                return b""
            plain = await _run(
                opened.open_chunks, len(sealed), sealed, first, ends=len(sealed) < span
            )
            skip = start - first * age.CHUNK
            return plain[skip : skip + length]

        return await self._with_key(name, read)

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        check_range(name, length)
        if not self.keys.identities:
            return await self.inner.get_tail(name, length)
        # Enough ciphertext for ``length`` bytes of plaintext whatever the chunk boundaries,
        # and for a small object, all of it, header included.
        chunks = -(-length // age.CHUNK) + 1
        sealed, size = await self.inner.get_tail(name, chunks * age.SEALED + _HEAD_READ)
        if len(sealed) >= size:  # the whole object: its key is kept for the block reads
            plain = await self._opened_whole(name, sealed, keep=True)
            return plain[-length:], len(plain)

        async def read(opened: age.Opened | None) -> tuple[bytes, int]:
            if opened is None:
                return sealed[-length:], size
            plain_size = age.plain_size(size, opened.header_length - age.NONCE, name)
            start = max(0, plain_size - length)
            first, offset, _ = opened.span(start, plain_size - start)
            window = size - len(sealed)
            if offset < window:  # cannot happen with the sizes above; never decrypt a part
                raise AssertionError(f"{name}: tail chunk {first} starts before the read")
            plain = await _run(
                opened.open_chunks, size - offset, sealed[offset - window :], first, ends=True
            )
            return plain[start - first * age.CHUNK :], plain_size

        return await self._with_key(name, read)

    async def _with_key(self, name: str, read: Callable[[age.Opened | None], Awaitable[T]]) -> T:
        """``read(key)`` with the object's kept key (``None``: not encrypted); when that fails
        authentication, once more with its header fetched again: the object may have been
        replaced since its key was kept."""
        try:
            return await read(await self._open(name, fresh=False))
        except CorruptObject:
            return await read(await self._open(name, fresh=True))

    async def _open(self, name: str, *, fresh: bool) -> age.Opened | None:
        """The object's unwrapped key (``None``: not encrypted), fetching its header once:
        reads of one object at once (a restore's ranges of one segment) wait for the first
        one's fetch rather than each fetching it. ``fresh``: fetch it again, whatever is
        kept (the object may have been replaced)."""
        while not fresh:
            if name in self._opened:
                self._opened.move_to_end(name)
                return self._opened[name]
            fetching = self._fetching.get(name)
            if fetching is None:
                break
            await fetching.wait()  # then kept, or failed: then fetch it here
        done = self._fetching[name] = anyio.Event()
        try:
            opened = await self._fetch_header(name)
        finally:
            if self._fetching.get(name) is done:
                del self._fetching[name]
            done.set()
        self._keep(name, opened)
        return opened

    async def _fetch_header(self, name: str) -> age.Opened | None:
        want = _HEAD_READ
        while True:
            head = await self.inner.get_range(name, 0, want)
            if not age.is_encrypted(head):
                return _PLAIN
            try:
                header = age.parse_header(head, name)
                if len(head) < header.length + age.NONCE and len(head) == want:
                    raise age.NeedHeader(header.length + age.NONCE)
            except age.NeedHeader as more:
                if len(head) < want:  # the object ended first
                    raise CorruptObject(
                        f"{name}: encrypted object cut short in its header"
                    ) from None
                want = max(more.needed, want * 2)
                continue
            return age.open_header(header, head[header.length :], self.keys.identities, name)

    def _keep(self, name: str, opened: age.Opened | None) -> None:
        self._opened[name] = opened
        self._opened.move_to_end(name)
        while len(self._opened) > HEADERS_KEPT:
            self._opened.popitem(last=False)

    def _forget(self, name: str) -> None:
        self._opened.pop(name, None)

    # -- the rest --------------------------------------------------------------------------

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


async def _run(fn: Callable[..., T], size: int, *args: object, **kwargs: object) -> T:
    """``fn(*args)`` here when ``size`` bytes are little work, else in a worker thread."""
    if size <= _INLINE:
        return fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def require_opens(storage: Storage, name: str) -> None:
    """Raise ``NotDecryptable`` when object ``name``, read through ``storage``, is still an
    age file: a storage with no identity passes ranged reads through unread (it cannot tell
    an encrypted object without fetching its header), so a reader whose object made no sense,
    or that must know before writing anything, asks here. Raises as ``get_range`` does."""
    if age.is_encrypted(await storage.get_range(name, 0, len(age.MAGIC))):
        raise age.NotDecryptable(age.missing_identity(name))


def _conforms(storage: AgeStorage) -> Storage:
    return storage  # the type checker proves AgeStorage is a Storage
