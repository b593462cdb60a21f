"""The manifest: which compacted objects make up the backup, committed one version at a time.

Uploaders write level-0 segments and never touch a manifest. Compaction writes everything
above level 0 (merged history, snapshots) and then commits a new manifest, which is the only
place those objects are named. A reader takes the newest manifest, plus the level-0
segments it does not mention, and needs no LIST of the whole history.

Names: ``{prefix}manifest/{seq:017d}.json``. A manifest is committed with
:meth:`Storage.put_new`, so of two compactors that both built on version ``n`` exactly one
commits ``n + 1``: the other finds the name taken, abandons its outputs and starts over from
the new version. Versions therefore form one chain, and what one version retires no later
version brings back.

The object is UTF-8 JSON on one line, a newline, then the lowercase hex SHA-256 of that
line: a damaged manifest is detected and named, never half-used.

What a version holds (see :class:`Manifest`):

- ``objects``: every object above level 0 that readers may need, each with its level, size,
  stamp and read-time span, the snapshot that *seals* it (``sealed``) if any, and ``damaged``
  when compaction found a block of it damaged (it is then never an input again);
- ``snapshots``: each snapshot's id, ``cut_us`` (the newest read time among everything it
  merged) and its parts (objects of level :data:`SNAPSHOT_LEVEL`);
- ``retired``: objects no longer needed, with the time they were retired, waiting out the
  grace period before they are deleted;
- ``floor_us``: the oldest restorable moment, once retention has dropped anything;
- ``last``: what the last compaction did; ``due``: when each step last ran.

**Reading rule** (:func:`objects_for`). A snapshot holds, per key, the newest record of
everything it merged (the previous snapshot and every unsealed object then), tombstones of
keys deleted before the retention window dropped. Every record it merged was read at or
before its ``cut_us``. So for a moment ``T >= cut_us`` the snapshot stands for every object
it sealed, and for every object an older snapshot sealed. A reader for ``T`` takes the
newest snapshot whose ``cut_us <= T`` (the *base*), and every object not sealed by the base
or an older snapshot. Level-0 segments are never sealed: they are merged into level 1 first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rrb_streams.errors import CorruptObject, ObjectExists, ObjectNotFound
from rrb_streams.storage.base import Storage

MANIFEST_DIR = "manifest/"
FORMAT = "rrb-manifest"
VERSION = 1
SNAPSHOT_LEVEL = 3  # levels: 0 uploaders, 1 minutes, 2 hours, 3 daily snapshots
KEEP_VERSIONS = 8  # older manifests are deleted: readers need only the newest


@dataclass(frozen=True, slots=True)
class Entry:
    """One object above level 0 that the manifest names."""

    name: str
    level: int
    size: int
    records: int
    min_stamp: int
    max_stamp: int
    min_read_us: int
    max_read_us: int
    sealed: int | None = None  # the id of the snapshot that stands for it
    snapshot: int | None = None  # for a snapshot part: its snapshot's id
    damaged: str | None = None  # why compaction leaves it alone
    #: The merge that wrote it, and its place among that merge's outputs: the outputs of one
    #: merge hold key ranges that follow each other, so a later merge reads them as one input.
    run: str | None = None
    part: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    cut_us: int  # newest read time among the records it merged
    taken_us: int  # compactor's clock when it committed
    keys: int  # records in its parts: one per live key


@dataclass(frozen=True, slots=True)
class Retired:
    name: str
    at_us: int  # compactor's clock when a manifest first left it out


@dataclass(frozen=True, slots=True)
class Manifest:
    """One committed version. Immutable: compaction builds the next with ``replace``."""

    seq: int = 0  # 0: no manifest yet
    written_us: int = 0
    writer: str = ""
    objects: tuple[Entry, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()
    retired: tuple[Retired, ...] = ()
    floor_us: int | None = None
    last: dict[str, Any] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)  # step -> last run, compactor clock

    @property
    def names(self) -> set[str]:
        return {e.name for e in self.objects}

    @property
    def retired_names(self) -> set[str]:
        return {r.name for r in self.retired}

    def live(self, level: int) -> list[Entry]:
        """Unsealed, undamaged objects of ``level``: the inputs a merge may take."""
        return [e for e in self.objects if e.level == level and e.sealed is None and not e.damaged]

    def snapshot_parts(self, snapshot_id: int) -> list[Entry]:
        """A snapshot's parts in key order: the order its merge wrote them in."""
        parts = (e for e in self.objects if e.snapshot == snapshot_id)
        return sorted(parts, key=lambda e: (e.part, e.name))

    def base_for(self, at_us: int | None) -> Snapshot | None:
        """The newest snapshot that stands for everything it sealed at ``at_us``."""
        usable = [s for s in self.snapshots if at_us is None or s.cut_us <= at_us]
        return max(usable, key=lambda s: s.id, default=None)


def manifest_name(prefix: str, seq: int) -> str:
    return f"{prefix}{MANIFEST_DIR}{seq:017d}.json"


def is_manifest_name(name: str, prefix: str = "") -> bool:
    return name.startswith(prefix + MANIFEST_DIR) and _seq_of(name, prefix) is not None


def _seq_of(name: str, prefix: str) -> int | None:
    tail = name[len(prefix + MANIFEST_DIR) :]
    stem, dot, ext = tail.partition(".")
    if ext != "json" or not dot or len(stem) != 17 or not stem.isascii() or not stem.isdigit():
        return None
    return int(stem)


def encode(m: Manifest) -> bytes:
    body = asdict(m)
    body = {"format": FORMAT, "version": VERSION, **body}
    line = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return line + b"\n" + hashlib.sha256(line).hexdigest().encode()


def decode(data: bytes, name: str) -> Manifest:
    """Raises ``CorruptObject`` naming ``name`` on any damage or unknown version."""
    line, _, digest = data.rpartition(b"\n")
    if not line or hashlib.sha256(line).hexdigest().encode() != digest:
        raise CorruptObject(f"{name}: manifest checksum does not match")
    try:
        raw = json.loads(line)
        if raw.pop("format") != FORMAT or raw.pop("version") != VERSION:
            raise CorruptObject(f"{name}: not a manifest of version {VERSION}")
        return Manifest(
            seq=int(raw["seq"]),
            written_us=int(raw["written_us"]),
            writer=str(raw["writer"]),
            objects=tuple(Entry(**e) for e in raw["objects"]),
            snapshots=tuple(Snapshot(**s) for s in raw["snapshots"]),
            retired=tuple(Retired(**r) for r in raw["retired"]),
            floor_us=raw["floor_us"],
            last=dict(raw["last"]),
            due={str(k): int(v) for k, v in raw["due"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptObject(f"{name}: malformed manifest: {exc}") from exc


async def manifest_names(storage: Storage, prefix: str) -> list[tuple[int, str]]:
    """Every manifest version under ``prefix``: ``(seq, name)``, oldest first."""
    out = []
    async for info in storage.list(prefix + MANIFEST_DIR):
        seq = _seq_of(info.name, prefix)
        if seq is not None:
            out.append((seq, info.name))
    return sorted(out)


async def read_latest(storage: Storage, prefix: str) -> Manifest:
    """The newest committed manifest; an empty one (``seq`` 0) when there is none.

    Raises ``CorruptObject`` naming the newest manifest when it is damaged: an older version
    may name objects that version retired and deleted since, so none is used in its place.
    A version deleted between the listing and the read (``KEEP_VERSIONS`` passed) means a
    newer one exists: the listing is taken again.
    """
    for _ in range(10):
        names = await manifest_names(storage, prefix)
        if not names:
            return Manifest()
        seq, name = names[-1]
        try:
            m = decode(await storage.get(name), name)
        except ObjectNotFound:
            continue
        if m.seq != seq:
            raise CorruptObject(f"{name}: holds version {m.seq}, not {seq}")
        return m
    raise CorruptObject(f"{prefix}{MANIFEST_DIR}: the newest manifest keeps disappearing")


async def commit(storage: Storage, prefix: str, m: Manifest) -> bool:
    """Write ``m`` as version ``m.seq`` unless that version exists. Whether it was ours.

    A retried call whose first attempt landed finds its own bytes and counts as committed.
    Makes the manifest durable (``flush``) before returning.
    """
    name, data = manifest_name(prefix, m.seq), encode(m)
    try:
        await storage.put_new(name, data)
    except ObjectExists:
        try:
            return await storage.get(name) == data
        except ObjectNotFound:
            return False
    await storage.flush()
    return True


async def prune(storage: Storage, prefix: str, keep: int = KEEP_VERSIONS) -> int:
    """Delete all but the newest ``keep`` manifest versions; how many it deleted."""
    names = await manifest_names(storage, prefix)
    old = names[:-keep] if keep else names
    for _, name in old:
        await storage.delete(name)
    return len(old)


def with_entries(m: Manifest, remove: Iterable[str], add: Iterable[Entry]) -> Manifest:
    gone = set(remove)
    return replace(m, objects=(*(e for e in m.objects if e.name not in gone), *add))
