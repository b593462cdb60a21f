"""Choosing what to restore: from a storage listing to one item per key.

The listing is ascending by name, and every object of one key shares the key's folder name
(:func:`rrb_streams.format.layout.key_dir`), so one pass over the listing sees each key's objects
together: the latest-state object first, then its versions oldest first. :func:`select`
keeps one key's candidates at a time and never holds the listing.

For each key it picks:

- the newest version read at or before ``--at`` (without ``--at``: the newest version);
- the latest-state object, when there is one.

A backup written partly with and partly without ``--versioning`` can hold both for a key.
Their names do not say which is newer, so the item names both and the writer restores the
newer one (by the read time inside). A key whose chosen version is a tombstone, with no
latest-state object, was absent at that time and is left out (``absent``).

Legacy objects (``--format legacy``) name the key's hash after the timestamp, so one key's
versions are scattered over the listing; :func:`legacy_rank` only rates each name, and
the caller keeps the best per key (in Redis, so memory stays bounded).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

from rrb_streams.format.layout import parse_name
from rrb_streams.format.legacy import LegacyName, parse_legacy_name
from rrb_streams.format.manifest import is_manifest_name
from rrb_streams.format.segment import parse_segment_name
from rrb_streams.storage.base import ObjectInfo, Storage


@dataclass(frozen=True, slots=True)
class Item:
    """One key to restore.

    ``group`` orders items as the listing does and is the planner's resume cursor.
    ``names`` holds one or two candidate objects; the writer restores the newest one that
    qualifies. ``size`` is their total size in bytes.
    """

    group: str
    names: tuple[str, ...]
    size: int


@dataclass
class PlanStats:
    """What one pass over the listing saw."""

    listed: int = 0  # objects listed
    foreign: int = 0  # names that are not rrb-streams objects: ignored
    versions: int = 0  # version objects (tombstones included)
    keys: int = 0  # items selected
    bytes: int = 0  # total size of the selected items' objects
    absent: int = 0  # keys deleted, or with nothing at or before --at
    superseded: int = 0  # keys whose newer state a segment range restored (both layouts)


@dataclass
class _Key:
    group: str
    latest: ObjectInfo | None = None
    best: ObjectInfo | None = None  # the chosen version
    best_tombstone: bool = False


def _group(prefix: str, db: int, key_hash: str) -> str:
    return f"{prefix}db{db}/{key_hash[:2]}/{key_hash}"


async def select(
    listing: AsyncIterable[ObjectInfo],
    prefix: str,
    *,
    at_us: int | None,
    stats: PlanStats,
    after: str | None = None,
    on_foreign: Callable[[str], None] | None = None,
) -> AsyncIterator[Item]:
    """Yield one :class:`Item` per restorable key of ``listing`` (objects under ``prefix``).

    Keys whose group sorts at or before ``after`` (a resumed plan's cursor) are passed over
    without counting. ``on_foreign`` is called with each name that is not one of ours.
    """
    current: _Key | None = None
    # On a resumed pass, names up to the first key past the cursor were counted already.
    past_cursor = after is None
    async for info in listing:
        parsed = parse_name(info.name, prefix)
        if parsed is None:
            if parse_segment_name(info.name, prefix) is not None or is_manifest_name(
                info.name, prefix
            ):
                continue  # the segment layout: read by key range, not here
            if past_cursor:
                stats.listed += 1
                stats.foreign += 1
                if on_foreign is not None:
                    on_foreign(info.name)
            continue
        group = _group(prefix, parsed.db, parsed.key_hash)
        if not past_cursor:
            if after is not None and group <= after:
                continue
            past_cursor = True
        if current is None or current.group != group:
            # Yield before counting this object: the caller records the counts with the
            # item as its cursor, and this object belongs after it.
            if current is not None and (item := _finish(current, stats)) is not None:
                yield item
            current = _Key(group)
        stats.listed += 1
        if parsed.read_at_us is None:
            current.latest = info
            continue
        stats.versions += 1
        if at_us is not None and parsed.read_at_us > at_us:
            continue
        current.best, current.best_tombstone = info, parsed.tombstone
    if current is not None and (item := _finish(current, stats)) is not None:
        yield item


def _finish(key: _Key, stats: PlanStats) -> Item | None:
    names: list[ObjectInfo] = []
    if key.best is not None and not (key.best_tombstone and key.latest is None):
        names.append(key.best)
    if key.latest is not None:
        names.append(key.latest)
    if not names:
        stats.absent += 1
        return None
    size = sum(i.size for i in names)
    stats.keys += 1
    stats.bytes += size
    return Item(key.group, tuple(i.name for i in names), size)


async def find_backup(
    listing: AsyncIterable[ObjectInfo], prefix: str, *, legacy: bool
) -> tuple[bool, bool]:
    """Whether ``listing`` holds any object of the format (latest state or version), and,
    when it holds none, whether it holds objects of the other format.

    Stops at the first object of the format, so it is quick on any real backup.
    """
    other = False
    async for info in listing:
        segment = parse_segment_name(info.name, prefix) is not None
        rrb = segment or parse_name(info.name, prefix) is not None
        legacy_found = parse_legacy_name(info.name, prefix) is not None
        ours, theirs = (legacy_found, rrb) if legacy else (rrb, legacy_found)
        if ours:
            return True, False
        other = other or bool(theirs)
    return False, other


async def has_versions(listing: AsyncIterable[ObjectInfo], prefix: str, *, legacy: bool) -> bool:
    """Whether any object of ``listing`` is a version or a segment (needed before ``--at``
    makes sense).

    Stops at the first version, so it is quick on a versioned backup.
    """
    async for info in listing:
        if legacy:
            found = parse_legacy_name(info.name, prefix)
            if found is not None and found.seconds is not None:
                return True
        else:
            if parse_segment_name(info.name, prefix) is not None:
                return True  # segments keep every read
            parsed = parse_name(info.name, prefix)
            if parsed is not None and parsed.versioned:
                return True
    return False


async def has_keys_layout(storage: Storage, prefix: str) -> bool:
    """Whether ``prefix`` holds any object of the keys layout (a prefix may hold both).

    Lists only names under ``{prefix}db``, where that layout's objects live: not every
    segment again."""
    async for _ in select(storage.list(f"{prefix}db"), prefix, at_us=None, stats=PlanStats()):
        return True
    return False


def legacy_rank(name: LegacyName, at_us: int | None) -> int | None:
    """The rank of a legacy object among its key's objects, or ``None`` when it does not qualify.

    The highest rank wins per key: a timestamped object ranks by its seconds plus one, so any
    of them beats the untimestamped ``<sha256>.backup`` (rank 0), whose age is unknown. With
    ``--at`` only timestamped objects at or before it qualify.
    """
    if name.seconds is None:
        return None if at_us is not None else 0
    if at_us is not None and name.seconds * 1_000_000 > at_us:
        return None
    return name.seconds + 1
