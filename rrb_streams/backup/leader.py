"""The bridges' leader lease: any number of bridges run for one source, exactly one writes.

**The lease.** ``{own}bridge:leader``, in the stream's Redis, holds the token of the bridge
that leads: ``<host>-<pid>-<random hex>``, so a ``GET`` tells an operator which one it is. It
is taken with ``SET NX PX <lease>`` and renewed every third of the lease by a script that
extends it only while it holds our token. A bridge that cannot take it stands by and tries
again about every third of the lease (jittered), or just after the lease runs out when that is
sooner. So a standby takes over at most one lease (plus a few milliseconds) after the leader's
last renewal: within the lease of a ``kill -9``. A leader that stops cleanly deletes the lease,
and a standby takes over at its next try. A bridge restarted after ``kill -9`` on the same
host takes the lease at once if the process that holds it is gone.

**Fencing.** A leader can be paused (SIGSTOP, a long GC pause, a network partition) past its
lease while a standby takes over, and resume with events in hand; its next renewal would come
too late to stop it writing them. So the bridge never XADDs on its own: each batch is one
script call that adds the entries only if the lease holds our token, atomically. A leader that
finds another token there writes nothing more: its term is cancelled, what it holds is dropped
(the new leader's takeover rescan covers it) and it stands by again.

**A lapsed lease that nobody took** (the leader was paused, or the stream's Redis restarted
without persistence) is taken back by the leader's next renewal or write: no other bridge led
meanwhile. It is still reported, through ``lapsed``, so the bridge rescans.

**Terms.** Each time a bridge becomes leader it runs a *term*: it subscribes, then rescans
(reason ``startup`` when it led from its start, else ``takeover``). Changes made between the
old leader's last write and the new leader's subscription reach the stream only through that
rescan.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import anyio
from redis.asyncio import Redis

from rrb_streams.retrying import TRANSIENT, Retrying
from rrb_streams.service import StopRequest
from rrb_streams.wire.keys import OwnKeys, default_consumer
from rrb_streams.wire.resp import FastScript

# KEYS: the lease. ARGV: token, lease ms. Returns {1} when the lease is ours now (also when it
# already was: a retried call), else {holder, remaining ms} (-1: the holder set no expiry).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1}
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

# KEYS: the lease. ARGV: token, lease ms. Returns 1 when extended, 2 when it had lapsed with
# nobody else holding it (it is ours again), else the holder's token.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if holder then
  return 1
end
return 2
"""

# KEYS: the lease, the change stream. ARGV: token, lease ms, fields per entry, then the fields
# of every entry. Adds the entries only while the lease is ours (taking a lapsed one back
# first): returns 1 or 2 as _RENEW does, else the holder's token, having added nothing.
_WRITE = """
local holder = redis.call('GET', KEYS[1])
local out = 1
if holder ~= ARGV[1] then
  if holder then
    return holder
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  out = 2
end
local width = tonumber(ARGV[3])
for i = 4, #ARGV, width do
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, i, i + width - 1))
end
return out
"""

# KEYS: the lease. ARGV: token. Deletes the lease if it is ours; 1 if it was.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# KEYS: the lease. ARGV: token, lease ms, the holder it must still have. Takes the lease from
# that holder; 1 if it did.
_TAKE = """
if redis.call('GET', KEYS[1]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_TOKENS: set[str] = set()  # every token of this process's bridges


def _gone(holder: str) -> bool:
    """Whether the token ``holder`` names a process of this host that no longer runs: its pid
    is free, or it is ours but not the token of one of our own bridges (a container restarted
    with the same pid)."""
    parts = holder.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return holder not in _TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it runs, as another user
    return False


@dataclass(frozen=True, slots=True)
class Claim:
    """One try at the lease: ``held``, or who holds it and for how much longer."""

    held: bool
    holder: str | None = None
    ttl_s: float | None = None  # None: held, or the holder's key has no expiry


@dataclass(frozen=True, slots=True)
class Held:
    """The lease as a renewal or a fenced write found it."""

    ours: bool
    retaken: bool = False  # it had lapsed, nobody else held it, and it is ours again
    holder: str | None = None  # the token holding it when not ours


def _held(reply: Any) -> Held:
    if reply == 1:
        return Held(True)
    if reply == 2:
        return Held(True, retaken=True)
    return Held(False, holder=_text(reply))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class Leadership:
    """One bridge's side of the leader lease on the stream Redis ``r``."""

    def __init__(
        self,
        r: Redis,
        own: OwnKeys,
        *,
        lease_s: float,
        log: Any,
        lapsed: Callable[[], None] = lambda: None,
    ) -> None:
        self._r = r
        self._key = own.leader
        self._stream = own.stream
        self._lease_ms = max(1, round(lease_s * 1000))
        self._log = log
        self._lapsed = lapsed
        self.token = f"{default_consumer()}-{secrets.token_hex(4)}"
        _TOKENS.add(self.token)
        self.leading = False
        self._claim = r.register_script(_CLAIM)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._take = r.register_script(_TAKE)
        self._write = FastScript(_WRITE)
        self._retry = Retrying(log, "bridge", "leader_lease", cap=self.interval)
        self._stop = StopRequest()
        self._term: anyio.CancelScope | None = None
        self._terms = 0

    @property
    def lease_s(self) -> float:
        """How long the lease lasts unless renewed."""
        return self._lease_ms / 1000

    @property
    def interval(self) -> float:
        """How often the leader renews, and about how often a standby tries to take over."""
        return self.lease_s / 3

    def stop(self) -> None:
        """Make :meth:`serve` stop standing by. A running term ends when it returns."""
        self._stop.stop()

    # -- one step each ----------------------------------------------------------------------

    async def claim(self) -> Claim:
        """Try once to take the lease (``SET NX PX``). Raises Redis errors."""
        reply = await self._claim(keys=[self._key], args=[self.token, self._lease_ms])
        if reply[0] == 1:
            self.leading = True
            return Claim(True)
        holder, ttl_ms = reply
        return Claim(False, _text(holder), None if int(ttl_ms) < 0 else int(ttl_ms) / 1000)

    async def renew(self) -> Held:
        """Extend the lease by a full lease if it holds our token, or take it back if it lapsed
        and nobody took it. Raises Redis errors."""
        return _held(await self._renew(keys=[self._key], args=[self.token, self._lease_ms]))

    async def release(self) -> bool:
        """Delete the lease if it holds our token; whether it did. Raises Redis errors."""
        self.leading = False
        return bool(await self._release(keys=[self._key], args=[self.token]))

    async def xadd(self, entries: Sequence[Sequence[bytes]]) -> bool:
        """Add ``entries`` (each the field/value list of one XADD, all of one length) to the
        change stream in one script call, only if the lease is ours. Returns whether they
        were added. When another bridge holds the lease this writes nothing, logs
        ``bridge.leadership_lost`` and cancels the current term.

        Raises Redis errors; a retry after a lost reply may add the entries twice.
        """
        if not entries:
            return True
        head = (self.token.encode(), b"%d" % self._lease_ms, b"%d" % len(entries[0]))
        args = (*head, *chain.from_iterable(entries))
        held = _held(await self._write(self._r, (self._key, self._stream), args))
        self._settle(held, "write")
        return held.ours

    # -- the loop -----------------------------------------------------------------------------

    async def serve(
        self,
        term: Callable[[str], Awaitable[None]],
        *,
        standing_by: Callable[[], None] = lambda: None,
    ) -> None:
        """Lead whenever the lease can be had, until :meth:`stop`.

        While the lease is ours, runs ``term(reason)`` and renews the lease alongside; the
        reason is ``"startup"`` for a first term that needed no wait, else ``"takeover"``.
        ``term`` must return only when asked to stop; it is cancelled when the lease is lost
        (``bridge.leadership_lost``), and the bridge stands by again. ``standing_by()`` is
        called each time it starts to stand by (``bridge.standby``). On the way out, also when
        cancelled, the lease is deleted if it is still ours, so a standby takes over at once.
        """
        try:
            while (waited := await self._wait_for_lease(standing_by)) is not None:
                stood_by, seconds = waited
                reason = "startup" if self._terms == 0 and not stood_by else "takeover"
                self._terms += 1
                self._log.info(
                    "bridge.became_leader",
                    token=self.token,
                    reason=reason,
                    waited=seconds,
                    lease=self.lease_s,
                )
                if await self._hold(term, reason):
                    return
        finally:
            await self._let_go()

    async def _wait_for_lease(self, standing_by: Callable[[], None]) -> tuple[bool, float] | None:
        """Try until the lease is ours: whether we had to stand by first and the seconds it
        took, or ``None`` once stopped."""
        stood_by = False
        since = time.monotonic()
        while not self._stop.requested:
            try:
                claim = await self.claim()
            except TRANSIENT as exc:
                with self._stop.interruptible():
                    await self._retry.failed(self, exc)
                continue
            self._retry.succeeded(self)
            if claim.held:
                return stood_by, round(time.monotonic() - since, 3)
            if self._terms == 0 and not stood_by and await self._replace_dead(claim.holder):
                return False, round(time.monotonic() - since, 3)
            if not stood_by:
                stood_by = True
                self._log.info("bridge.standby", token=self.token, leader=claim.holder)
                standing_by()
            with self._stop.interruptible():
                await anyio.sleep(self._poll_delay(claim.ttl_s))
        return None

    async def _replace_dead(self, holder: str | None) -> bool:
        """At start, take the lease from a dead process of this host (a bridge restarted after
        ``kill -9`` need not wait out its own old lease); whether it did. Only at start: should
        two hosts share a name and not each other's processes (containers), the mistaken
        bridge takes the lease once and the other, fenced off, stands by without taking it
        back."""
        if holder is None or not _gone(holder):
            return False
        try:
            taken = bool(
                await self._take(keys=[self._key], args=[self.token, self._lease_ms, holder])
            )
        except TRANSIENT:
            return False  # the ordinary claim tries again
        if taken:
            self.leading = True
            self._log.info("bridge.dead_leader_replaced", token=self.token, leader=holder)
        return taken

    def _poll_delay(self, ttl_s: float | None) -> float:
        delay = self.interval * random.uniform(0.5, 1.0)
        if ttl_s is not None and ttl_s < delay:
            # The lease runs out before the next try: be there when it does. The jitter keeps
            # standbys from all asking in the same millisecond (SET NX lets one win anyway).
            return ttl_s + random.uniform(0.001, 0.02)
        return delay

    async def _hold(self, term: Callable[[str], Awaitable[None]], reason: str) -> bool:
        """Run one term: ``True`` when it returned (asked to stop), ``False`` when lost."""
        try:
            async with anyio.create_task_group() as tg:
                self._term = tg.cancel_scope
                tg.start_soon(self._keep)
                await term(reason)
                tg.cancel_scope.cancel()
                return True
            return False
        finally:
            self._term = None

    async def _keep(self) -> None:
        """Renew every third of the lease; a failed renewal is retried sooner."""
        while True:
            await anyio.sleep(self.interval)
            while True:
                try:
                    held = await self.renew()
                except TRANSIENT as exc:
                    await self._retry.failed(self, exc)
                    continue
                break
            self._retry.succeeded(self)
            self._settle(held, "renewal")

    def _settle(self, held: Held, found_by: str) -> None:
        if held.retaken:
            self._log.warning("bridge.lease_retaken", token=self.token, found_by=found_by)
            self._lapsed()
        if held.ours or not self.leading:
            return
        self.leading = False
        self._log.warning(
            "bridge.leadership_lost", token=self.token, leader=held.holder, found_by=found_by
        )
        if self._term is not None:
            self._term.cancel()

    async def _let_go(self) -> None:
        if not self.leading:
            return
        with anyio.move_on_after(5, shield=True):
            try:
                released = await self.release()
            except TRANSIENT as exc:
                # It lapses by itself: standbys then take over within one lease.
                self._log.warning("bridge.lease_release_failed", token=self.token, error=str(exc))
                return
            self._log.info("bridge.lease_released", token=self.token, released=released)
