"""``rrb-status``: the state of the change stream, as an operator or a test reads it.

The pipeline has drained when every group has nothing pending and nothing undelivered.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.wire.entries import id_tuple
from rrb_streams.wire.keys import OwnKeys


@dataclass
class ConsumerStatus:
    name: str
    pending: int
    idle_ms: int


@dataclass
class GroupStatus:
    name: str
    pending: int
    lag: int | None  # entries not yet delivered; None when Redis cannot tell
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    consumers: list[ConsumerStatus] = field(default_factory=list)


@dataclass
class StreamStatus:
    stream: str
    exists: bool
    length: int
    last_id: str | None
    dead_letters: int
    groups: list[GroupStatus] = field(default_factory=list)

    @property
    def drained(self) -> bool:
        """True when every group has acknowledged everything written so far."""
        return bool(self.groups) and all(g.pending == 0 and g.lag == 0 for g in self.groups)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["drained"] = self.drained
        return json.dumps(data, indent=2)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def collect(r: Redis, own: OwnKeys) -> StreamStatus:
    """Read the stream, its groups, consumers and dead letters. Read-only."""
    stream = own.stream
    dead = int(await r.xlen(own.dead))
    try:
        info = await r.xinfo_stream(stream)
    except ResponseError:
        return StreamStatus(stream, exists=False, length=0, last_id=None, dead_letters=dead)
    sec, usec = await r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    status = StreamStatus(
        stream,
        exists=True,
        length=int(info["length"]),
        last_id=_text(info["last-generated-id"]),
        dead_letters=dead,
    )
    for g in await r.xinfo_groups(stream):
        name = _text(g["name"])
        oldest: str | None = None
        age: int | None = None
        if g["pending"]:
            summary = await r.xpending(stream, name)
            # Acked since XINFO GROUPS: nothing is pending any more.
            if summary["min"] is not None:
                oldest = _text(summary["min"])
                age = max(0, now_ms - id_tuple(oldest)[0])
        lag = g.get("lag")
        group = GroupStatus(
            name=name,
            pending=int(g["pending"]),
            lag=None if lag is None else int(lag),
            oldest_pending_id=oldest,
            oldest_pending_age_ms=age,
        )
        for c in await r.xinfo_consumers(stream, name):
            group.consumers.append(
                ConsumerStatus(_text(c["name"]), int(c["pending"]), int(c["idle"]))
            )
        status.groups.append(group)
    return status


def render(status: StreamStatus) -> str:
    """A short human-readable report."""
    if not status.exists:
        return f"stream {status.stream}: does not exist (no bridge has run against this Redis)"
    lines = [
        f"stream {status.stream}: {status.length} entries, last id {status.last_id}",
        f"dead letters: {status.dead_letters}",
    ]
    for g in status.groups:
        lag = "unknown" if g.lag is None else str(g.lag)
        age = "" if g.oldest_pending_age_ms is None else f", oldest {g.oldest_pending_age_ms} ms"
        lines.append(f"group {g.name}: pending {g.pending}{age}, lag {lag}")
        lines.extend(
            f"  consumer {c.name}: pending {c.pending}, idle {c.idle_ms} ms" for c in g.consumers
        )
    if not status.groups:
        lines.append("no consumer group yet (no uploader has run)")
    lines.append("drained" if status.drained else "not drained")
    return "\n".join(lines)
