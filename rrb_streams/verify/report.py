"""What ``rrb-verify`` prints when it ends: the summary, its JSON form, the exit status.

Exit status: 0 when nothing differs, 3 when differences were found (they are named, up to
:data:`EXAMPLES` per kind). Errors exit 1 and bad input 2, as for every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("missing", "stale", "extra")
EXAMPLES = 10


@dataclass
class Summary:
    """What a run found. ``examples`` holds up to :data:`EXAMPLES` names per kind."""

    checked: int = 0  # keys compared: objects in scope plus live keys that have none
    missing: int = 0
    stale: int = 0
    extra: int = 0
    changing: int = 0  # differences that moved while checked: the pipeline is on them
    unreadable: int = 0  # keys the source refused to read (ACL, a broken module type)
    queued: int = 0  # change-stream entries added by --repair
    examples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    @property
    def differences(self) -> int:
        return self.missing + self.stale + self.extra

    def to_dict(self, *, repair: bool) -> dict[str, Any]:
        """The ``--json`` object."""
        out: dict[str, Any] = {
            "checked": self.checked,
            "missing": self.missing,
            "stale": self.stale,
            "extra": self.extra,
            "changing": self.changing,
            "unreadable": self.unreadable,
            "examples": self.examples,
        }
        if repair:
            out["queued"] = self.queued
        return out


def render(summary: Summary, *, repair: bool) -> str:
    """The human summary: one line of counts, then each kind with its examples."""
    s = summary
    verdict = "storage matches the source" if not s.differences else "differences found"
    lines = [
        f"Verify: {verdict}: {s.checked:,} keys checked, {s.missing:,} missing, "
        f"{s.stale:,} stale, {s.extra:,} extra"
    ]
    for kind in KINDS:
        shown = s.examples[kind]
        if shown:
            more = getattr(s, kind) - len(shown)
            tail = f" (and {more:,} more)" if more > 0 else ""
            lines.append(f"  {kind}: {', '.join(shown)}{tail}")
    if s.changing:
        lines.append(f"  changing while checked (not counted): {s.changing:,}")
    if s.unreadable:
        lines.append(f"  refused by the source (not counted): {s.unreadable:,}")
    if repair:
        lines.append(f"  repair: {s.queued:,} entries queued for the uploaders")
    return "\n".join(lines)


def exit_status(summary: Summary) -> int:
    """0 when nothing differs, 3 when differences were found (1 and 2: errors, bad input)."""
    return 3 if summary.differences else 0
