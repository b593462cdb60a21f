"""A restore run's state in Redis: its identity, its keys, and the atomic steps on them.

A run is named by a digest of everything that decides *what* it restores (storage, prefix,
target, filters, ``--at``, format), so running the same command again finds the same run,
and a second process started with it joins it. Its keys, all under rrb's own prefix::

    {own}restore:{run}            the restore stream: each entry a batch of keys to restore
                                  (i: JSON list of each key's candidate object names,
                                  s: their bytes), or one key range of the segment layout
                                  (r: the range and its blocks as JSON, n: their records,
                                  s: their bytes, m: 1 when the prefix holds both layouts)
    {own}restore:{run}:run        a hash: the planner's cursor and counters, the outcomes
    {own}restore:{run}:failed     a hash: failed object name -> reason (the first 1,000)
    {own}restore:{run}:legacy     a hash, --format legacy only: key hash -> its best object
    {own}restore:{run}:planner    the planner's lock, with a TTL
    {own}restore:{run}:seen       a set, a prefix with both layouts only: the keys that
                                  segment ranges restored (their key folder names), which
                                  the keys layout's objects then leave alone

When they live in a Redis Cluster (the target, or ``--stream-url``, is a cluster node), every
name carries the hash tag of rrb's own keys (``rrb:{rrb:}restore:{run}…`` with the default
prefix; see :class:`rrb_streams.wire.keys.OwnKeys`): all of them in one slot, so each
transaction and script over them runs on the one master that owns it.

An entry holds a batch of keys, so the stream's own costs (XADD, XREADGROUP, XACK) are paid
once per batch, not per key. Every step that must not be half-done is one MULTI/EXEC or one
script: a chunk of entries is added together with the cursor that says so; an entry is
acknowledged together with its counters, and counted only when this XACK is the one that
acknowledged it, so counters stay exact when two writers hold the same entry. A finished run
deletes every one of its keys in one transaction, and the process whose transaction found
them prints the run's totals.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.config import RestoreConfig
from rrb_streams.format.ranges import Range
from rrb_streams.format.selection import Item
from rrb_streams.wire import resp
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.urls import redact_url, url_db

GROUP = "rrb-restore"
FAILED_NAMES_KEPT = 1000

# Counters of the run hash. ``done`` counts acknowledged entries (every outcome).
PLAN_COUNTERS = ("planned", "planned_bytes", "listed", "foreign", "absent_planned")
OUTCOME_COUNTERS = ("restored", "expired", "filtered", "existing", "absent", "failed")

# ARGV: group, cap of failed names kept, then per entry:
#   id, n, n pairs (counter, increment), m, m pairs (failed object name, reason)
_ACK = """
local acked = 0
local i = 3
while i <= #ARGV do
  local ok = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  for j = 0, n - 1 do
    if ok then redis.call('HINCRBY', KEYS[2], ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
  end
  i = i + 2 * n
  local m = tonumber(ARGV[i])
  i = i + 1
  for j = 0, m - 1 do
    if ok and redis.call('HLEN', KEYS[3]) < tonumber(ARGV[2]) then
      redis.call('HSET', KEYS[3], ARGV[i + 2 * j], ARGV[i + 2 * j + 1])
    end
  end
  i = i + 2 * m
  if ok then acked = acked + 1 end
end
return acked
"""

# Keep, per key hash, the legacy object of the highest rank ("<rank> <size> <name>"), if
# the caller still holds the planner's lock.
_OFFER = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
for i = 5, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (not cur) or tonumber(string.match(cur, '^%d+')) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
  end
end
redis.call('HSET', KEYS[2], 'cursor', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'listed', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'foreign', ARGV[4])
return 1
"""

# Run commands (ARGV: token, then per command its length and its arguments) only if the
# caller still holds the planner's lock: a planner that lost it must not add a chunk that
# its successor, resuming from the cursor, adds as well.
_GUARDED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + 1 + n
end
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def target_identity(url: str) -> str:
    """The target as a run's identity sees it: host, port and db; never user or password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}?db={url_db(url)}"
    return f"{(parts.hostname or '').lower()}:{parts.port or 6379}/{url_db(url)}"


def run_id(cfg: RestoreConfig) -> str:
    """16 hex digits naming the run that ``cfg`` describes."""
    what = {
        "storage": cfg.storage.description,
        "prefix": cfg.path_prefix,
        "target": target_identity(cfg.target_url),
        "match": cfg.match,
        "db": cfg.db,
        "at_us": cfg.at_us,
        "format": cfg.format,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def describe(cfg: RestoreConfig) -> str:
    """What the run restores, in words, kept in the run hash for operators."""
    parts = [f"{cfg.storage.description}{cfg.path_prefix} -> {redact_url(cfg.target_url)}"]
    if cfg.at_us is not None:
        parts.append(f"at {cfg.at_us} us")
    if cfg.match != "*":
        parts.append(f"match {cfg.match}")
    if cfg.db is not None:
        parts.append(f"db {cfg.db}")
    if cfg.legacy:
        parts.append("legacy format")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class RunKeys:
    """The names of one run's keys; in one slot when ``cluster``."""

    own_prefix: str
    run: str
    cluster: bool = False

    @property
    def stream(self) -> str:
        return OwnKeys(self.own_prefix, cluster=self.cluster).name(f"restore:{self.run}")

    @property
    def meta(self) -> str:
        return f"{self.stream}:run"

    @property
    def failed(self) -> str:
        return f"{self.stream}:failed"

    @property
    def legacy(self) -> str:
        return f"{self.stream}:legacy"

    @property
    def planner(self) -> str:
        return f"{self.stream}:planner"

    @property
    def seen(self) -> str:
        return f"{self.stream}:seen"

    def all(self) -> list[str]:
        return [self.stream, self.meta, self.failed, self.legacy, self.planner, self.seen]


@dataclass(frozen=True, slots=True)
class Ack:
    """One entry to acknowledge, with what became of its keys.

    ``counts`` are increments of the run's counters (outcomes, ``bytes``, ``done``), and
    ``failures`` the failed objects with their reasons.
    """

    entry_id: str
    counts: Mapping[str, int]
    failures: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Totals:
    """A run's counters, as the run hash holds them."""

    counters: dict[str, int]
    plan_done: bool
    started: float
    failures: list[tuple[str, str]]

    def __getitem__(self, name: str) -> int:
        return self.counters.get(name, 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_totals(
    raw: Mapping[bytes, bytes], failures: Mapping[bytes, bytes] | None = None
) -> Totals:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    counters = {
        k: int(v)
        for k, v in fields.items()
        if k in (*PLAN_COUNTERS, *OUTCOME_COUNTERS, "done", "bytes")
    }
    return Totals(
        counters=counters,
        plan_done=fields.get("plan_done") == "1",
        started=float(fields.get("started", "0") or 0),
        failures=sorted((_text(k), _text(v)) for k, v in (failures or {}).items()),
    )


class PlannerLockLost(Exception):
    """The planner's lock ran out and another process may be planning: stop planning."""


class RunState:
    """The atomic steps on one run's keys, on the Redis that holds the restore stream.

    The planning steps (:meth:`add`, :meth:`offer`, :meth:`set_phase`, :meth:`add_legacy`)
    take effect only while ``token`` holds the planner's lock, and raise ``PlannerLockLost``
    otherwise.
    """

    def __init__(self, r: Redis, keys: RunKeys, token: str) -> None:
        self.r = r
        self.keys = keys
        self.token = token
        self._ack = r.register_script(_ACK)
        self._offer = r.register_script(_OFFER)
        self._guarded_script = r.register_script(_GUARDED)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)

    async def join(self, description: str) -> bool:
        """Create the run unless it exists. Returns ``True`` when this joined an existing run.

        A run hash whose stream is gone (deleted by hand) cannot be resumed: entries it
        planned are lost. It is reset and the run starts over.
        """
        k = self.keys
        replies = await resp.transaction(
            self.r,
            [
                (b"XGROUP", b"CREATE", k.stream.encode(), GROUP.encode(), b"0", b"MKSTREAM"),
                (b"HSETNX", k.meta.encode(), b"started", f"{time.time():.6f}".encode()),
                (b"HSETNX", k.meta.encode(), b"what", description.encode()),
            ],
        )
        created_group = not isinstance(replies[0], ResponseError)
        if isinstance(replies[0], ResponseError) and "BUSYGROUP" not in str(replies[0]):
            raise replies[0]
        fresh = replies[1] == 1
        if created_group and not fresh:
            await self.r.delete(k.meta, k.failed, k.legacy)
            await self.r.hset(
                k.meta, mapping={"started": f"{time.time():.6f}", "what": description}
            )
            return False
        return not fresh

    async def totals(self) -> Totals:
        raw: dict[bytes, bytes] = await self.r.hgetall(self.keys.meta)  # type: ignore[assignment]
        return parse_totals(raw)

    async def exists(self) -> bool:
        return bool(await self.r.exists(self.keys.meta))

    # -- planning ---------------------------------------------------------------------------

    async def add(
        self,
        items: Sequence[Item],
        *,
        per_entry: int,
        cursor: str | None,
        done: bool,
        **counts: int,
    ) -> None:
        """Add ``items`` to the stream, ``per_entry`` to an entry, with the plan's cursor and
        counter deltas, atomically."""
        commands = self._add_commands(
            items, per_entry=per_entry, cursor=cursor, done=done, counts=counts
        )
        await self._guarded(commands)

    async def _guarded(self, commands: Sequence[tuple[bytes, ...]]) -> None:
        if not commands:
            return
        args: list[Any] = [self.token]
        for command in commands:
            args += [len(command), *command]
        k = self.keys
        done = await self._guarded_script(
            keys=[k.planner, k.stream, k.meta, k.legacy, k.failed], args=args
        )
        if not done:
            raise PlannerLockLost(f"lost the planner's lock of {k.stream}")

    def _add_commands(
        self,
        items: Sequence[Item],
        *,
        per_entry: int,
        cursor: str | None,
        done: bool,
        counts: Mapping[str, int],
    ) -> list[tuple[bytes, ...]]:
        k = self.keys
        stream, meta = k.stream.encode(), k.meta.encode()
        commands: list[tuple[bytes, ...]] = []
        for start in range(0, len(items), per_entry):
            batch = items[start : start + per_entry]
            names = json.dumps([item.names for item in batch], separators=(",", ":"))
            size = sum(item.size for item in batch)
            commands.append((b"XADD", stream, b"*", b"i", names.encode(), b"s", b"%d" % size))
        deltas = {
            "planned": len(items),
            "planned_bytes": sum(item.size for item in items),
            **counts,
        }
        commands += [(b"HINCRBY", meta, n.encode(), b"%d" % v) for n, v in deltas.items() if v]
        if cursor is not None:
            commands.append((b"HSET", meta, b"cursor", cursor.encode()))
        if done:
            commands.append((b"HSET", meta, b"plan_done", b"1"))
        return commands

    async def add_ranges(
        self, ranges: Sequence[Range], *, mixed: bool, cursor: str, done: bool, listed: int = 0
    ) -> None:
        """Add one entry per key range, with the plan's range cursor (and ``listed`` objects
        more), atomically."""
        k = self.keys
        stream, meta = k.stream.encode(), k.meta.encode()
        commands: list[tuple[bytes, ...]] = []
        for rng in ranges:
            fields = [b"r", rng.to_json().encode(), b"n", b"%d" % rng.records]
            fields += [b"s", b"%d" % rng.size]
            if mixed:
                fields += [b"m", b"1"]
            commands.append((b"XADD", stream, b"*", *fields))
        planned = sum(r.records for r in ranges)
        planned_bytes = sum(r.size for r in ranges)
        commands += [
            (b"HINCRBY", meta, b"planned", b"%d" % planned),
            (b"HINCRBY", meta, b"planned_bytes", b"%d" % planned_bytes),
            (b"HINCRBY", meta, b"listed", b"%d" % listed),
            (b"HSET", meta, b"range_cursor", cursor.encode()),
        ]
        if done:
            commands.append((b"HSET", meta, b"phase", b"keys"))
            if mixed:
                commands.append((b"HSET", meta, b"mixed", b"1"))
        await self._guarded(commands)

    async def add_failures(self, failures: Sequence[tuple[str, str]]) -> None:
        """Count objects that failed while planning (a damaged segment index), with reasons."""
        k = self.keys
        commands: list[tuple[bytes, ...]] = [
            (b"HINCRBY", k.meta.encode(), b"failed", b"%d" % len(failures))
        ]
        for name, reason in failures[:FAILED_NAMES_KEPT]:
            commands.append((b"HSET", k.failed.encode(), name.encode(), reason.encode()))
        await self._guarded(commands)

    async def is_mixed(self) -> bool:
        """Whether the prefix holds both layouts (known once the ranges are planned)."""
        return await self.r.hget(self.keys.meta, "mixed") == b"1"

    async def range_cursor(self) -> str | None:
        """How far the segment ranges are planned: the last added range's end, as JSON."""
        value = await self.r.hget(self.keys.meta, "range_cursor")
        return _text(value) if value else None

    async def mark_seen(self, groups: Sequence[str]) -> None:
        """Record keys a segment range restored, so the keys layout leaves them alone."""
        if groups:
            await self.r.sadd(self.keys.seen, *groups)

    async def unseen(self, groups: Sequence[str]) -> list[bool]:
        """Per group, whether no segment range restored it."""
        if not groups:
            return []
        found = await self.r.smismember(self.keys.seen, list(groups))
        return [not f for f in found]

    async def cursor(self) -> tuple[str | None, str]:
        """The plan's cursor and its phase (``group`` or ``feed``, legacy only)."""
        cursor, phase = await self.r.hmget(self.keys.meta, ["cursor", "phase"])
        return (_text(cursor) if cursor else None), (_text(phase) if phase else "group")

    async def backlog(self) -> int:
        """Objects planned and not yet acknowledged."""
        planned, done = await self.r.hmget(self.keys.meta, ["planned", "done"])
        return int(planned or 0) - int(done or 0)

    async def offer(
        self, offers: Sequence[tuple[str, int, int, str]], *, cursor: str, listed: int, foreign: int
    ) -> None:
        """Legacy: keep the best of ``(key_hash, rank, size, name)`` per key, with the cursor."""
        args: list[Any] = [self.token, cursor, listed, foreign]
        for key_hash, rank, size, name in offers:
            args += [key_hash, rank, f"{size} {name}"]
        k = self.keys
        if not await self._offer(keys=[k.legacy, k.meta, k.planner], args=args):
            raise PlannerLockLost(f"lost the planner's lock of {k.stream}")

    async def set_phase(self, phase: str) -> None:
        await self._guarded([(b"HSET", self.keys.meta.encode(), b"phase", phase.encode())])

    async def take_legacy(self, count: int) -> list[tuple[str, Item]]:
        """Up to ``count`` kept legacy objects, as ``(key_hash, item)``; empty when none left."""
        cursor = 0
        while True:
            reply: Any = await self.r.hscan(self.keys.legacy, cursor, count=count)
            cursor, fields = reply
            if fields:
                out = []
                for key_hash, value in fields.items():
                    _rank, size, name = _text(value).split(" ", 2)
                    out.append((_text(key_hash), Item(_text(key_hash), (name,), int(size))))
                return out
            if cursor == 0:
                return []

    async def add_legacy(
        self, taken: Sequence[tuple[str, Item]], *, per_entry: int, done: bool
    ) -> None:
        """Move taken legacy objects into the stream, in one transaction with their removal."""
        commands = self._add_commands(
            [item for _, item in taken], per_entry=per_entry, cursor=None, done=done, counts={}
        )
        if taken:
            commands.append((b"HDEL", self.keys.legacy.encode(), *(h.encode() for h, _ in taken)))
        await self._guarded(commands)

    # -- the planner's lock -----------------------------------------------------------------

    async def take_planner(self, ttl: float) -> bool:
        return bool(await self.r.set(self.keys.planner, self.token, nx=True, px=int(ttl * 1000)))

    async def renew_planner(self, ttl: float) -> bool:
        args: list[Any] = [self.token, int(ttl * 1000)]
        return bool(await self._renew(keys=[self.keys.planner], args=args))

    async def release_planner(self) -> None:
        await self._release(keys=[self.keys.planner], args=[self.token])

    # -- writing ----------------------------------------------------------------------------

    async def ack(self, acks: Sequence[Ack]) -> int:
        """Acknowledge entries and count their outcomes; returns how many this call acked."""
        args: list[Any] = [GROUP, FAILED_NAMES_KEPT]
        for a in acks:
            counts = [(k, v) for k, v in a.counts.items() if v]
            args += [a.entry_id, len(counts)]
            for k, v in counts:
                args += [k, v]
            args.append(len(a.failures))
            for name, reason in a.failures:
                args += [name, reason]
        keys = [self.keys.stream, self.keys.meta, self.keys.failed]
        return int(await self._ack(keys=keys, args=args))

    async def finished(self) -> bool:
        """Whether everything was planned, delivered and acknowledged (one snapshot)."""
        k = self.keys
        replies = await resp.transaction(
            self.r,
            [
                (b"HGET", k.meta.encode(), b"plan_done"),
                (b"XPENDING", k.stream.encode(), GROUP.encode()),
                (b"XINFO", b"STREAM", k.stream.encode()),
                (b"XINFO", b"GROUPS", k.stream.encode()),
            ],
        )
        plan_done, pending, stream, groups = replies
        if plan_done != b"1" or any(
            isinstance(x, ResponseError) for x in (pending, stream, groups)
        ):
            return False
        if int(pending[0]):
            return False
        last = _flat(stream).get("last-generated-id")
        ours = [g for g in (_flat(g) for g in groups) if _text(g.get("name", b"")) == GROUP]
        return bool(ours) and _text(ours[0].get("last-delivered-id", b"")) == _text(last or b"")

    async def finish(self) -> Totals | None:
        """Delete the run's keys; its totals, or ``None`` when another process finished it."""
        k = self.keys
        replies = await resp.transaction(
            self.r,
            [
                (b"HGETALL", k.meta.encode()),
                (b"HGETALL", k.failed.encode()),
                (b"DEL", *(name.encode() for name in k.all())),
            ],
        )
        meta, failed = _pairs(replies[0]), _pairs(replies[1])
        if not meta:
            return None
        return parse_totals(meta, failed)


def _flat(reply: Any) -> dict[str, Any]:
    """A RESP2 flat ``[name, value, …]`` reply as a dict with text names."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}


def _pairs(reply: Any) -> dict[bytes, bytes]:
    if isinstance(reply, dict):
        return reply
    return {reply[i]: reply[i + 1] for i in range(0, len(reply) - 1, 2)}
