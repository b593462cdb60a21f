"""Which segment objects a reader needs: the newest manifest plus the level-0 segments.

Readers (restore, verify, compaction itself) never LIST the compacted history: the manifest
names it (:mod:`rrb_streams.format.manifest`). Only level 0, which uploaders write and
compaction keeps small, is listed. Before the first compaction there is no manifest and every
segment is read, as the listing gives them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rrb_streams.errors import ConfigError
from rrb_streams.format.manifest import Manifest, Snapshot, manifest_names, read_latest
from rrb_streams.format.segment import parse_segment_name, segments_prefix
from rrb_streams.storage.base import ObjectInfo, Storage


class BeforeRetention(ConfigError):
    """``--at`` names a moment older than anything retention kept."""

    def __init__(self, at_us: int, floor_us: int) -> None:
        super().__init__(
            f"--at {moment(at_us)} is before the oldest restorable moment, {moment(floor_us)}: "
            "retention has collapsed the history before it"
        )
        self.floor_us = floor_us


def moment(us: int) -> str:
    """A read time as an operator reads it: ISO 8601 in UTC, to the millisecond."""
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")


@dataclass
class View:
    """What to read for one moment (``None``: the latest state)."""

    manifest: Manifest
    objects: list[ObjectInfo] = field(default_factory=list)
    base: Snapshot | None = None
    level0: int = 0  # of ``objects``, those listed at level 0


async def list_segments(
    storage: Storage, prefix: str, level: int | None = None
) -> AsyncIterator[ObjectInfo]:
    """Every segment object under ``prefix`` (of one level, or all), in name order."""
    async for info in storage.list(segments_prefix(prefix, level)):
        if parse_segment_name(info.name, prefix) is not None:
            yield info


async def level0(storage: Storage, prefix: str, manifest: Manifest) -> list[ObjectInfo]:
    """The level-0 segments the manifest does not mention: neither retired (merged, waiting
    for deletion) nor named (set aside as damaged)."""
    known = manifest.retired_names | manifest.names
    return [i async for i in list_segments(storage, prefix, 0) if i.name not in known]


async def read_view(storage: Storage, prefix: str, *, at_us: int | None = None) -> View:
    """The objects that hold every record a reader for ``at_us`` may need.

    The manifest is read before level 0 is listed, and its version checked again after: a
    compaction that committed in between may have deleted level-0 segments the listing then
    misses, whose records only the newer version names. The view is then taken again.

    Raises :class:`BeforeRetention` when ``at_us`` is older than the manifest's floor, and
    ``CorruptObject`` when the newest manifest is damaged.
    """
    while True:
        m = await read_latest(storage, prefix)
        view = await _view_of(storage, prefix, m, at_us)
        names = await manifest_names(storage, prefix)
        if (names[-1][0] if names else 0) == m.seq:
            return view


async def _view_of(storage: Storage, prefix: str, m: Manifest, at_us: int | None) -> View:
    if m.seq == 0:
        listed = [info async for info in list_segments(storage, prefix)]
        return View(m, listed, None, len(listed))
    if at_us is not None and m.floor_us is not None and at_us < m.floor_us:
        raise BeforeRetention(at_us, m.floor_us)
    base = m.base_for(at_us)
    covered = {s.id for s in m.snapshots if base is not None and s.id <= base.id}
    objects = []
    for e in m.objects:
        if e.snapshot is not None:
            wanted = base is not None and e.snapshot == base.id
        else:
            wanted = e.sealed is None or e.sealed not in covered
        if wanted:
            objects.append(ObjectInfo(e.name, e.size))
    zero = await level0(storage, prefix, m)
    return View(m, objects + zero, base, len(zero))
