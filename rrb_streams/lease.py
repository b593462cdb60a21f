"""Per-key leases and done markers on the stream Redis: how last write wins per key.

**Leases.** An uploader writes a key's object only while it holds the key's lease
(``{own}lease:{db}:{key_hash}``, a random token set with ``SET NX PX``), and it reads the key
from the source after taking the lease. Two uploaders never read-and-write one key at the same
time, and of two successive holders the later one read later: its object is the newer state.

**Lost leases.** A lease can still run out while its holder's storage call is slow. Another
uploader then takes it, reads a newer state and writes it, and the slow write may land
afterwards, stale. The release script catches that: it deletes the lease and advances the done
marker only while the token is still ours. A holder whose token is gone redoes the key: takes
the lease again, reads again, writes again, whatever the done marker says. Its new read happens
after its stale write landed, so a stale write is always followed by a fresh one. If the holder
dies before its redo, its entries stay pending; whoever claims them writes the key again without
consulting the done marker, for the same reason.

**Done markers.** ``{own}done:{db}:{key_hash}`` holds the highest change-stream entry id whose
change is already in storage for the key. An entry at or below it was added to the stream before
the read that produced the stored object, so its change happened before that read: it is
acknowledged with no read and no write. A holder sets the marker, in the script that releases
the lease, to the stream's last entry id as seen right after taking the lease (not only to the
newest entry of its batch), so every change already in the stream when it read is covered. This
is what turns a hot key's thousands of changes into a handful of PUTs.

**Residual case.** A storage write that the client gave up on (a timeout, a cancelled request,
a crashed process) but that the server still commits later can overwrite a newer object, and
nothing redoes it until the key next changes. The writer never learns that the write landed, so
no token check can catch it. Storage timeouts shorter than the lease keep the window small, and
``rrb-verify`` finds such keys. With ``--versioning`` a stale write cannot hide a newer version:
every read has its own object name.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from rrb_streams.changes import OwnKeys, id_tuple

DONE_TTL_MS = 10 * 60 * 1000  # long enough to cover any entry still in flight for the key

# KEYS: lease, done. ARGV: token, done id ("" to leave the marker), marker ttl ms.
# Returns 1 when the token was still ours (lease released), 0 when the lease was lost.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '' then
  return 1
end
local function older(a, b)
  -- decimal strings without leading zeros: shorter is smaller, else compare as text
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not ams then return true end  -- an unreadable marker is replaced
  if not bms then return false end
  if ams ~= bms then return older(ams, bms) end
  return older(aseq, bseq)
end
local cur = redis.call('GET', KEYS[2])
if (not cur) or id_less(cur, ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of one key's acquire: whether we hold it, and its done marker if we do."""

    held: bool
    done: str | None  # highest entry id already in storage; None when unknown or not held

    def covers(self, entry_id: str) -> bool:
        """Whether ``entry_id``'s change is already in storage (valid only when held)."""
        return self.held and self.done is not None and id_tuple(entry_id) <= id_tuple(self.done)


@dataclass(frozen=True, slots=True)
class Release:
    """One lease to release; ``done`` advances the marker (only if greater) when not ``None``."""

    db: int
    key_hash: str
    done: str | None = None


class Leases:
    """Leases and done markers for one uploader process, on the stream Redis."""

    def __init__(self, r: Redis, own: OwnKeys, stream: str, *, lease_s: float) -> None:
        self._r = r
        self._own = own
        self._stream = stream
        self._lease_ms = max(1, int(lease_s * 1000))
        self._release = r.register_script(_RELEASE)

    @staticmethod
    def new_token() -> str:
        """A token no other holder will ever use."""
        return secrets.token_hex(16)

    async def acquire(
        self, keys: Sequence[tuple[int, str]], token: str
    ) -> tuple[list[Grant], str | None]:
        """Try to take every ``(db, key_hash)`` lease with ``token``, in one round trip.

        A lease that already holds ``token`` counts as taken: a retried pipeline, or a release
        that never arrived, must not make the holder wait out its own lease. Returns one
        :class:`Grant` per key and the stream's last entry id, read after the leases were
        taken (``None`` for an empty stream). Any entry at or below that id was added before
        the caller reads the source, so a successful write may cover it.
        """
        pipe = self._r.pipeline(transaction=False)
        for db, h in keys:
            lease = self._own.lease(db, h)
            pipe.set(lease, token, nx=True, px=self._lease_ms)
            pipe.get(lease)
            pipe.get(self._own.done(db, h))
        pipe.xrevrange(self._stream, "+", "-", count=1)
        replies = await pipe.execute()
        grants = []
        for i in range(len(keys)):
            _, holder, done = replies[3 * i : 3 * i + 3]
            held = holder is not None and _text(holder) == token
            grants.append(Grant(held, _text(done) if held and done is not None else None))
        last = replies[-1]
        tail = _text(last[0][0]) if last else None
        return grants, tail

    async def release(self, token: str, items: Sequence[Release]) -> list[bool]:
        """Release leases held with ``token``, advancing done markers, in one round trip.

        Returns, per item, whether the lease was still ours. ``False`` means another holder
        may have written the key since our read: the caller must redo the key.
        """
        if not items:
            return []
        pipe = self._r.pipeline(transaction=False)
        for it in items:
            await self._release(
                keys=[self._own.lease(it.db, it.key_hash), self._own.done(it.db, it.key_hash)],
                args=[token, it.done or "", DONE_TTL_MS],
                client=pipe,
            )
        return [bool(x) for x in await pipe.execute()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
