"""``rrb-status --storage``: the state of a segment-layout backup, read from storage alone.

What an operator asks of a backup, answered without Redis:

- the **recovery point**: the newest read time any stored record holds. A restore now gets
  the source as it was then. It is the larger of the manifest's objects' ``max_read_us`` and
  the block indexes of the newest level-0 segments (:data:`FOOTERS_AT_EACH_END` of them by
  name, which is by ordering stamp);
- the **oldest restorable moment**: the manifest's ``floor_us`` once retention dropped
  anything, else the oldest read time any object holds;
- objects and bytes per level (``0``, ``1``, ``2``, ``snapshot``), those retired and waiting
  out the grace period, and those above level 0 that no manifest names yet (a pass that is
  writing, or one that died: the next pass retires them);
- the snapshots, the last compaction step, and whether compaction is **overdue**: a level-0
  segment has waited longer than :data:`OVERDUE_FACTOR` times ``--level1-every`` and no
  manifest was committed for as long (or none ever was).

It costs one LIST of ``segments/``, two of ``manifest/``, one GET of the newest manifest and a
ranged GET of at most ``2 * FOOTERS_AT_EACH_END`` block indexes (more LISTs when a compaction
commits meanwhile). Read-only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from rrb_streams.crypt.age import NotDecryptable
from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.format.manifest import (
    MANIFEST_DIR,
    SNAPSHOT_LEVEL,
    Manifest,
    manifest_names,
    read_latest,
)
from rrb_streams.format.ranges import read_footer_of
from rrb_streams.format.segment import Footer, parse_segment_name
from rrb_streams.format.view import list_segments, moment
from rrb_streams.ops.encryption_state import Encryption, collect_encryption, render_encryption
from rrb_streams.storage.base import ObjectInfo, Storage

FOOTERS_AT_EACH_END = 8  # level-0 indexes read at the oldest and at the newest end
OVERDUE_FACTOR = 3  # compaction is overdue after this many --level1-every intervals
LEVELS = ("0", "1", "2", "snapshot")
_SHOWN = 10  # names listed per problem in the human report
_LOOKS = 3  # listings taken while compaction keeps committing under them


def level_label(level: int) -> str:
    """``0``, ``1``, ``2`` or ``snapshot``: the label of the metrics and of the report."""
    return "snapshot" if level == SNAPSHOT_LEVEL else str(level)


@dataclass
class Tally:
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size


@dataclass
class BackupState:
    """What :func:`collect_backup` found. Times are Unix microseconds: read times on the
    source's clock, ``now_us`` and manifest times on the clock of the host that wrote them."""

    location: str
    now_us: int
    overdue_after_s: float
    manifest: int = 0  # the newest version; 0: no compaction has committed yet
    manifest_written_us: int | None = None
    manifest_writer: str | None = None
    newest_read_us: int | None = None
    oldest_restorable_us: int | None = None
    floor_us: int | None = None  # set once retention dropped anything
    levels: dict[str, Tally] = field(default_factory=lambda: {lv: Tally() for lv in LEVELS})
    waiting: int = 0  # level-0 segments no manifest mentions: not merged yet
    waiting_since_us: int | None = None  # the oldest read among them
    retired: Tally = field(default_factory=Tally)
    unnamed: Tally = field(default_factory=Tally)
    snapshots: int = 0
    newest_snapshot_cut_us: int | None = None
    last_compaction: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)  # named by the manifest, not in storage
    damaged: list[tuple[str, str]] = field(default_factory=list)  # set aside by compaction
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # indexes read here
    #: Why the manifest and block indexes were not read (encrypted, and no identity given):
    #: then only the listing, the names and the objects' headers speak.
    locked: str | None = None
    encryption: Encryption = field(default_factory=Encryption)

    @property
    def found(self) -> bool:
        """Whether the location holds a segment-layout backup at all."""
        return (
            self.manifest > 0
            or any(t.objects for t in self.levels.values())
            or bool(self.retired.objects)
        )

    @property
    def recovery_age_s(self) -> float | None:
        if self.newest_read_us is None:
            return None
        return max(0.0, (self.now_us - self.newest_read_us) / 1e6)

    @property
    def overdue(self) -> bool:
        """A level-0 segment waited too long, and no manifest was committed meanwhile."""
        limit = self.now_us - int(self.overdue_after_s * 1e6)
        if self.waiting == 0 or self.waiting_since_us is None or self.waiting_since_us > limit:
            return False
        return self.manifest_written_us is None or self.manifest_written_us <= limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "storage": self.location,
            "now_us": self.now_us,
            "recovery_point_us": self.newest_read_us,
            "recovery_point_age_seconds": _round(self.recovery_age_s),
            "oldest_restorable_us": self.oldest_restorable_us,
            "floor_us": self.floor_us,
            "levels": {lv: vars(t) for lv, t in self.levels.items()},
            "waiting_level0": self.waiting,
            "waiting_since_us": self.waiting_since_us,
            "retired": vars(self.retired),
            "unnamed": vars(self.unnamed),
            "snapshots": self.snapshots,
            "newest_snapshot_cut_us": self.newest_snapshot_cut_us,
            "manifest": self.manifest,
            "manifest_written_us": self.manifest_written_us,
            "manifest_writer": self.manifest_writer,
            "last_compaction": self.last_compaction,
            "compaction_overdue": self.overdue,
            "overdue_after_seconds": self.overdue_after_s,
            "missing": self.missing,
            "damaged": [{"object": n, "reason": r} for n, r in self.damaged],
            "unreadable": [{"object": n, "reason": r} for n, r in self.unreadable],
            "locked": self.locked,
            "encryption": self.encryption.to_dict(),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def collect_backup(
    storage: Storage,
    prefix: str,
    *,
    level1_every: float,
    compaction_grace: float = 600.0,
    now_us: int | None = None,
) -> BackupState:
    """Read the state of the backup under ``prefix``. Raises ``CorruptObject`` when the newest
    manifest is damaged, and storage errors; a block index that cannot be read is counted in
    ``unreadable`` instead.

    An encrypted backup read with no identity that opens it is ``locked``: the manifest and
    the block indexes are not read, every level-0 segment counts as waiting, and compaction
    is overdue only once one is older than the overdue limit plus ``compaction_grace``
    (merged segments stay that long before they are deleted).
    """
    locked: str | None = None
    for _ in range(_LOOKS):
        try:
            m = await read_latest(storage, prefix)
        except NotDecryptable as exc:
            m, locked = Manifest(), str(exc)
        listed = [info async for info in list_segments(storage, prefix)]
        # A version committed meanwhile would make its merges look unmerged: look again.
        versions = await manifest_names(storage, prefix)
        if (versions[-1][0] if versions else 0) == m.seq:
            break
    state = BackupState(
        location=f"{storage.description}/{prefix}".rstrip("/"),
        now_us=time.time_ns() // 1000 if now_us is None else now_us,
        overdue_after_s=OVERDUE_FACTOR * level1_every + (compaction_grace if locked else 0),
        locked=locked,
    )
    manifests = [info async for info in storage.list(f"{prefix}{MANIFEST_DIR}")]
    state.encryption = await collect_encryption(storage, listed + manifests)
    if locked:
        state.manifest = versions[-1][0] if versions else 0
    waiting = _tally(state, m, listed, prefix)
    footers = await _footers(storage, [] if locked else _ends(waiting), state)
    _describe(state, m)
    merged = [e for e in m.objects if not e.damaged and e.records]
    newest = [e.max_read_us for e in merged] + [f.max_read_at_us for f in footers if f.records]
    state.newest_read_us = max(newest, default=None)
    early = [f.min_read_at_us for f in footers if f.records]
    # No index readable: the names' stamps, microseconds of the stream Redis's clock.
    stamps = [s.min_stamp for i in waiting if (s := parse_segment_name(i.name, prefix))]
    state.waiting_since_us = min(early or stamps, default=None)
    state.oldest_restorable_us = (
        m.floor_us
        if m.floor_us is not None
        else min([e.min_read_us for e in merged] + early, default=None)
    )
    return state


def _tally(
    state: BackupState, m: Manifest, listed: list[ObjectInfo], prefix: str
) -> list[ObjectInfo]:
    """Count the listing by level; return the level-0 segments no manifest mentions."""
    named, retired = m.names, m.retired_names
    waiting = []
    for info in listed:
        parsed = parse_segment_name(info.name, prefix)
        assert parsed is not None  # list_segments yields segment names only
        if info.name in retired:
            state.retired.add(info.size)
            continue
        state.levels.setdefault(level_label(parsed.level), Tally()).add(info.size)
        if parsed.level == 0 and info.name not in named:
            waiting.append(info)
        elif parsed.level > 0 and info.name not in named:
            state.unnamed.add(info.size)
    state.waiting = len(waiting)
    there = {info.name for info in listed}
    state.missing = sorted(e.name for e in m.objects if e.name not in there)
    return waiting


def _ends(infos: list[ObjectInfo]) -> list[ObjectInfo]:
    """The oldest and the newest :data:`FOOTERS_AT_EACH_END`, each once, in name order."""
    if len(infos) <= 2 * FOOTERS_AT_EACH_END:
        return infos
    return infos[:FOOTERS_AT_EACH_END] + infos[-FOOTERS_AT_EACH_END:]


async def _footers(storage: Storage, infos: list[ObjectInfo], state: BackupState) -> list[Footer]:
    found: list[Footer] = []

    async def one(info: ObjectInfo) -> None:
        try:
            found.append(await read_footer_of(storage, info))
        except ObjectNotFound:
            pass  # merged and deleted since the listing: the manifest's figures hold it
        except NotDecryptable as exc:
            state.locked = state.locked or str(exc)
        except CorruptObject as exc:
            state.unreadable.append((info.name, str(exc)))

    async with anyio.create_task_group() as tg:
        for info in infos:
            tg.start_soon(one, info)
    state.unreadable.sort()
    return found


def _describe(state: BackupState, m: Manifest) -> None:
    """What the manifest itself says: its version, snapshots, floor, last step, damage."""
    if m.seq == 0:
        return
    state.manifest = m.seq
    state.manifest_written_us = m.written_us
    state.manifest_writer = m.writer
    state.floor_us = m.floor_us
    state.snapshots = len(m.snapshots)
    state.newest_snapshot_cut_us = max((s.cut_us for s in m.snapshots), default=None)
    state.last_compaction = dict(m.last) or None
    state.damaged = sorted((e.name, e.damaged) for e in m.objects if e.damaged)


# -- the human report ----------------------------------------------------------------------------


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def age_text(seconds: float) -> str:
    """``42 s``, ``12 min``, ``5.2 h`` or ``3.1 d``."""
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(state: BackupState, us: int) -> str:
    return f"{moment(us)} ({age_text(max(0.0, (state.now_us - us) / 1e6))} ago)"


_LAST_COUNTS = (
    ("inputs", "object"),
    ("records_in", "record"),
    ("outputs", "object"),
    ("records_out", "record"),
)


def _many(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _objects(t: Tally) -> str:
    return f"{_many(t.objects, 'object')}, {size_text(t.bytes)}"


def render_backup(state: BackupState) -> str:
    """A short human-readable report of :func:`collect_backup`'s findings."""
    lines = [f"backup {state.location}:"]
    if state.newest_read_us is None:
        lines.append("recovery point: none (no record stored yet)")
    else:
        lines.append(f"recovery point: {_when(state, state.newest_read_us)}")
    if state.oldest_restorable_us is not None:
        why = "retention floor" if state.floor_us is not None else "oldest read kept"
        lines.append(f"oldest restorable moment: {moment(state.oldest_restorable_us)} ({why})")
    for label in LEVELS:
        extra = f", {state.waiting:,} waiting for level 1" if label == "0" else ""
        name = "snapshot parts" if label == "snapshot" else f"level {label}"
        lines.append(f"{name}: {_objects(state.levels[label])}{extra}")
    if state.snapshots:
        assert state.newest_snapshot_cut_us is not None
        lines.append(
            f"snapshots kept: {state.snapshots}, the newest cut at "
            f"{moment(state.newest_snapshot_cut_us)}"
        )
    lines.append(f"retired, awaiting deletion: {_objects(state.retired)}")
    if state.unnamed.objects:
        lines.append(
            f"not in the manifest yet (a pass writing, or one that died): {_objects(state.unnamed)}"
        )
    lines += render_encryption(state.encryption)
    if state.locked:
        lines.append(f"manifest and block indexes not read: {state.locked}")
    lines += _compaction_lines(state)
    lines += _problems("named by the manifest but missing from storage", state.missing)
    lines += _problems("damaged, set aside by compaction", [f"{n}: {r}" for n, r in state.damaged])
    lines += _problems("unreadable block index", [f"{n}: {r}" for n, r in state.unreadable])
    return "\n".join(lines)


def _compaction_lines(state: BackupState) -> list[str]:
    if state.manifest == 0:
        lines = ["compaction: none yet (no manifest)"]
    elif state.locked:
        lines = [f"manifest {state.manifest}: encrypted, not read"]
    else:
        assert state.manifest_written_us is not None
        lines = [
            f"manifest {state.manifest}: written {_when(state, state.manifest_written_us)} "
            f"by {state.manifest_writer or 'unknown'}"
        ]
        last = state.last_compaction
        if last:
            counts = [_many(int(last.get(k, 0)), n) for k, n in _LAST_COUNTS]
            lines.append(
                f"last compaction step: {last.get('step')}, {counts[0]} ({counts[1]}) into "
                f"{counts[2]} ({counts[3]}) in {float(last.get('seconds', 0.0)):.1f} s"
                + (f", at {moment(int(last['at_us']))}" if "at_us" in last else "")
            )
    after = age_text(state.overdue_after_s)
    if state.overdue:
        assert state.waiting_since_us is not None
        lines.append(
            f"COMPACTION OVERDUE: level-0 segments waiting since "
            f"{_when(state, state.waiting_since_us)}, over {after} (is rrb-compact or an "
            "uploader with compaction running?)"
        )
    else:
        lines.append(f"compaction: on schedule (overdue after {after})")
    return lines


def _problems(what: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"{what}: {len(items)}"]
    lines += [f"  {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        lines.append(f"  … and {len(items) - _SHOWN} more")
    return lines
