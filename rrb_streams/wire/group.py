"""Consumer groups on a Redis Stream: creating them, trimming safely, and one consumer's reads.

Both flows consume a stream through a group: the uploaders the change stream, the restore
writers a run's restore stream. :class:`GroupReader` is the one reader they share. Each of
them reads entries three ways:

- new entries (``XREADGROUP … >``);
- its own pending entries, left from a run of the same consumer name that died or was cut
  short (``XREADGROUP … 0``, the consumer's history): the *sweep*;
- other consumers' entries idle for longer than a claim timeout (``XAUTOCLAIM``): their
  consumer died or is stuck.

An entry that the reader handed out and the caller has not yet :meth:`~GroupReader.done` is
*in hand*. The sweep and the claims never hand out an entry in hand a second time, so one
process never works on an entry twice at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.wire import resp
from rrb_streams.wire.entries import id_tuple, next_id

#: One entry as read: its id as text, and its fields (empty when it was deleted while pending).
RawEntry = tuple[str, Mapping[bytes, bytes]]

_XCLAIM_CHUNK = 1000  # ids per XCLAIM of the keep-alive


async def ensure_group(r: Redis, stream: str, group: str) -> None:
    """Create the stream and the group (reading from the start) unless they exist. Idempotent."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def safe_trim_id(r: Redis, stream: str) -> str | None:
    """The lowest id that every group still needs, or ``None`` when nothing may be trimmed.

    For each group that is its oldest pending (delivered, unacked) entry, or the entry after the
    last one it was delivered when none is pending. Entries below the minimum over all groups
    are acked by everyone and safe to drop. With no group at all nothing is trimmed: an entry no
    group has read is still owed to someone.
    """
    try:
        groups: list[dict[str, Any]] = await r.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    if not groups:
        return None
    needed: list[tuple[int, int]] = []
    for g in groups:
        name = g["name"]
        after_delivered = id_tuple(next_id(g["last-delivered-id"]))
        if g.get("pending", 0):
            summary = await r.xpending(stream, name)
            # Acked since XINFO: nothing is pending below what the group had been delivered.
            needed.append(id_tuple(summary["min"]) if summary["min"] else after_delivered)
        else:
            needed.append(after_delivered)
    ms, seq = min(needed)
    return f"{ms}-{seq}"


async def trim(r: Redis, stream: str) -> int:
    """Drop entries every group has acked (``XTRIM MINID``). Returns how many went."""
    minid = await safe_trim_id(r, stream)
    if minid is None:
        return 0
    return int(await r.xtrim(stream, minid=minid, approximate=False))


class GroupReader:
    """One consumer ``consumer`` of ``group`` on ``stream``, on the Redis ``r``.

    Every method raises Redis errors as they come (the caller retries), and each one that
    returns entries puts them in hand first.
    """

    def __init__(self, r: Redis, stream: str, group: str, consumer: str) -> None:
        self.r = r
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.in_hand: set[str] = set()
        self._stream, self._group = stream.encode(), group.encode()
        self._consumer = consumer.encode()

    async def read(self, count: int, block_ms: int | None) -> list[RawEntry]:
        """Up to ``count`` new entries, waiting up to ``block_ms`` for the first (``None``:
        not at all)."""
        entries = await self._xreadgroup(">", count, block_ms)
        self.in_hand.update(entry_id for entry_id, _ in entries)
        return entries

    async def sweep(self, count: int) -> AsyncIterator[list[RawEntry]]:
        """This consumer's pending entries that are not in hand, ``count`` at a time, oldest
        first: entries delivered to an earlier run of this consumer name, or delivered to this
        one by a read that was cut short."""
        last = "0"
        while True:
            # Snapshot first: an entry the caller acks during the read is in the snapshot.
            known = set(self.in_hand)
            entries = await self._xreadgroup(last, count, None)
            if not entries:
                return
            last = entries[-1][0]
            fresh = [e for e in entries if e[0] not in known]
            if fresh:
                self.in_hand.update(entry_id for entry_id, _ in fresh)
                yield fresh

    async def claim(
        self, idle_s: float, count: int, start: str = "0-0"
    ) -> tuple[str, list[RawEntry]]:
        """One ``XAUTOCLAIM`` step from ``start``: take up to ``count`` entries idle for
        ``idle_s`` seconds. Returns where the next step starts (``"0-0"`` once the walk went
        round) and the entries taken that were not in hand already."""
        known = set(self.in_hand)  # see sweep
        reply = await self.r.xautoclaim(
            self.stream, self.group, self.consumer, int(idle_s * 1000), start, count=count
        )
        next_start, claimed = reply[0], reply[1]
        fresh = [e for e in _entries(claimed) if e[0] not in known]
        self.in_hand.update(entry_id for entry_id, _ in fresh)
        return _text(next_start), fresh

    def done(self, ids: Iterable[str]) -> None:
        """The caller is done with ``ids`` (acknowledged, or given up): no longer in hand."""
        self.in_hand.difference_update(ids)

    async def keep_alive(self, min_idle_s: float) -> None:
        """Reset the idle time of every entry in hand (``XCLAIM … JUSTID`` to ourselves), so
        live consumers do not claim work this process still holds. Entries idle for less than
        ``min_idle_s`` stay where they are: another consumer may have just claimed them."""
        ids: list[Any] = list(self.in_hand)
        for i in range(0, len(ids), _XCLAIM_CHUNK):
            await self.r.xclaim(
                self.stream,
                self.group,
                self.consumer,
                int(min_idle_s * 1000),
                ids[i : i + _XCLAIM_CHUNK],
                justid=True,
            )

    async def leave(self) -> bool:
        """Delete this consumer from the group when nothing is pending on it, so restarts
        under fresh names do not pile up dead consumers. Returns whether it was deleted."""
        mine = await self.r.xpending_range(
            self.stream, self.group, "-", "+", 1, consumername=self.consumer
        )
        if mine:
            return False
        await self.r.xgroup_delconsumer(self.stream, self.group, self.consumer)
        return True

    async def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[RawEntry]:
        # Sent raw: redis-py's reply callback costs more than the uploader's work per entry.
        command = [b"XREADGROUP", b"GROUP", self._group, self._consumer, b"COUNT", b"%d" % count]
        if block_ms is not None:
            command += (b"BLOCK", b"%d" % block_ms)
        command += (b"STREAMS", self._stream, start.encode())
        (reply,) = await resp.pipeline(self.r, [tuple(command)])
        if isinstance(reply, ResponseError):
            raise reply
        if not reply:
            return []
        streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
        return [
            (_text(entry_id), _fields(flat))
            for entries in streams
            for entry_id, flat in entries
            if entry_id is not None
        ]


def _fields(flat: Any) -> Mapping[bytes, bytes]:
    """An entry's field list (``None`` for an entry deleted while pending) as a mapping."""
    if not flat:
        return {}
    if isinstance(flat, dict):
        return flat
    if len(flat) == 8 and flat[0] == b"db" and flat[2] == b"key":  # the bridge's own layout
        return {b"db": flat[1], b"key": flat[3], flat[4]: flat[5], flat[6]: flat[7]}
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _entries(raw: Iterable[Any]) -> list[RawEntry]:
    """``(id, fields)`` pairs from a parsed XREADGROUP / XAUTOCLAIM reply, ids as text."""
    return [(_text(entry_id), fields or {}) for entry_id, fields in raw if entry_id is not None]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
