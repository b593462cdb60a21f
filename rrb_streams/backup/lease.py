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

**Renewal.** A round can outlast one lease: hundreds of keys written to a slow store. Its
holder renews its leases while the round makes progress, but never the lease of a key whose
storage call is in flight: a call that hangs past the lease must lose it, so that another
uploader can write the key and the hung call's late landing is redone (see above). A key
not yet written, or whose write has returned, is safe to keep: no write of ours for it can
land later.

**The stored-keys index.** The acquire also reads the key's field of the index
(:mod:`rrb_streams.wire.index`), and the release script updates it, in the same token check as the
done marker: a holder that lost its lease leaves the index alone, and its redo writes whatever
the index says, because its stale write may have landed after the write the index describes.

**Round trips.** A round of a batch takes all its leases in one Lua script call, and
releases them in another (one call per :data:`CHUNK` keys), rather than several commands per
key. Every key a script touches is one of its ``KEYS``.

**Ordering stamps.** Every acquire call also draws a stamp from ``{own}stamp``, a clock on
the stream Redis that only moves forward: the larger of its last value plus one and the stream
Redis's own ``TIME`` in microseconds, so even a stream Redis restarted empty goes on above the
stamps it gave before (as long as its clock does not step back past them). A read made under a
lease carries the stamp of the acquire that took the lease. Of two holders of one key, the
later one acquired after the earlier one's lease ended, so the later read has the higher
stamp. The segment layout stores the stamp in every record and readers take, per key, the
record with the highest stamp, so the order in which objects land no longer matters.

**Residual case (the keys layout).** A storage write that the client gave up on (a timeout, a
cancelled request, a crashed process) but that the server still commits later can overwrite a
newer object, and nothing redoes it until the key next changes; a rescan does not either while
the index holds the newer digest. The writer never learns that the write landed, so no token
check can catch it. Storage timeouts shorter than the lease keep the window small, and
``rrb-verify`` finds such keys. With ``--versioning`` a stale write cannot hide a newer
version: every read has its own object name. The segment layout has no such case: a late
segment carries older stamps than the records written after it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import NamedTuple

from redis.asyncio import Redis

from rrb_streams.wire.entries import id_tuple
from rrb_streams.wire.index import Stored
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.resp import FastScript

DONE_TTL_MS = 10 * 60 * 1000  # long enough to cover any entry still in flight for the key

#: Keys per script call: a round's leases go in as few calls as this allows, and no call
#: blocks Redis for long: a full chunk runs in one to two milliseconds.
CHUNK = 250

# KEYS: the stream, then n leases, then n done markers, then (with ARGV[3] == "1") n index
# hashes, then the stamp clock. ARGV: token, lease ms, "1" to read index fields, then the n
# fields when reading. Returns the stream's last entry id (false when empty), read after every
# lease was tried, the stamp drawn, then per key: 1 if held (0 if not), and when held its done
# marker and its index value.
_ACQUIRE = """
local token, px = ARGV[1], ARGV[2]
local with_index = ARGV[3] == '1'
local n = with_index and (#KEYS - 2) / 3 or (#KEYS - 2) / 2
-- Stamps are microseconds, below 2^53: exact in Lua's doubles. %.0f keeps them in digits.
local clock = KEYS[#KEYS]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stamp = math.max(tonumber(redis.call('GET', clock) or '0') + 1, now)
redis.call('SET', clock, string.format('%.0f', stamp))
local out = {false, string.format('%.0f', stamp)}
for i = 1, n do
  local lease = KEYS[1 + i]
  local held = redis.call('SET', lease, token, 'NX', 'PX', px)
  if not held then
    -- a retried call, or a release that never arrived: our own token is still ours
    held = redis.call('GET', lease) == token
  end
  if held then
    out[#out + 1] = 1
    out[#out + 1] = redis.call('GET', KEYS[1 + n + i])
    if with_index then
      out[#out + 1] = redis.call('HGET', KEYS[1 + 2 * n + i], ARGV[3 + i])
    else
      out[#out + 1] = false
    end
  else
    out[#out + 1] = 0
    out[#out + 1] = false
    out[#out + 1] = false
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then
  out[1] = last[1][1]
end
return out
"""

# KEYS: per item its lease, done marker and index hash. ARGV: token, marker ttl ms, then per
# item: done id ("" leaves the marker), index action ("" leaves the index, "set" stores the
# digest under the field, "del" removes the field), field, digest.
# Returns per item 1 when the token was still ours (lease released), 0 when it was lost.
_RELEASE = """
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
local token, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS / 3 do
  local lease, done, index = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 4 * i - 1
  local id, action, field = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if redis.call('GET', lease) ~= token then
    out[i] = 0
  else
    redis.call('DEL', lease)
    if action == 'set' then
      redis.call('HSET', index, field, ARGV[a + 3])
    elseif action == 'del' then
      redis.call('HDEL', index, field)
    end
    if id ~= '' then
      local cur = redis.call('GET', done)
      if (not cur) or id_less(cur, id) then
        redis.call('SET', done, id, 'PX', ttl)
      end
    end
    out[i] = 1
  end
end
return out
"""

# KEYS: leases. ARGV: token, lease ms. Extends each lease still holding the token; returns
# per key 1 when extended, 0 when it was no longer ours.
_RENEW = """
local out = {}
for i, lease in ipairs(KEYS) do
  if redis.call('GET', lease) == ARGV[1] then
    -- SET rather than PEXPIRE: the same commands as the acquire, so the same ACL rules
    redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class Grant(NamedTuple):
    """The outcome of one key's acquire: whether we hold it, and its done marker if we do."""

    held: bool
    done: str | None  # highest entry id already in storage; None when unknown or not held
    stored: bytes | None = None  # the key's index value when held; None when not indexed
    stamp: int = 0  # the ordering stamp drawn with the lease, when held

    def covers(self, entry_id: str) -> bool:
        """Whether ``entry_id``'s change is already in storage (valid only when held)."""
        return self.held and self.done is not None and id_tuple(entry_id) <= id_tuple(self.done)


class Release(NamedTuple):
    """One lease to release; ``done`` advances the marker (only if greater) when not ``None``;
    ``stored`` updates the key's index field when not ``None``."""

    db: int
    key_hash: str
    done: str | None = None
    stored: Stored | None = None


class Leases:
    """Leases and done markers for one uploader process, on the stream Redis."""

    def __init__(self, r: Redis, own: OwnKeys, stream: str, *, lease_s: float) -> None:
        self._r = r
        self._own = own
        self._stream = stream
        self._lease_ms = max(1, int(lease_s * 1000))
        # Packed in one go: a chunk's call carries a thousand arguments.
        self._acquire = FastScript(_ACQUIRE)
        self._release = FastScript(_RELEASE)
        self._renew = FastScript(_RENEW)

    @property
    def lease_s(self) -> float:
        """How long a lease lasts unless renewed."""
        return self._lease_ms / 1000

    @staticmethod
    def new_token() -> str:
        """A token no other holder will ever use."""
        return secrets.token_hex(16)

    async def acquire(
        self,
        keys: Sequence[tuple[int, str]],
        token: str,
        *,
        index_fields: Sequence[bytes] | None = None,
    ) -> tuple[list[Grant], str | None]:
        """Try to take every ``(db, key_hash)`` lease with ``token``: one script call per
        :data:`CHUNK` keys (two for a full batch of the default 500 entries).

        A lease that already holds ``token`` counts as taken: a retried call, or a release
        that never arrived, must not make the holder wait out its own lease. Returns one
        :class:`Grant` per key and the stream's last entry id, read after every lease was
        taken (``None`` for an empty stream). Any entry at or below that id was added before
        the caller reads the source, so a successful write may cover it.

        ``index_fields`` (the raw keys, one per lease) also reads each key's index value into
        :attr:`Grant.stored`; only holders change it, so it stays valid while the lease does.
        """
        if index_fields is not None and len(index_fields) != len(keys):
            raise ValueError("index_fields must name one key per lease")
        own = self._own
        grants: list[Grant] = []
        tail: str | None = None
        start = 0
        while True:
            chunk = keys[start : start + CHUNK]
            script_keys: list[str] = [self._stream]
            script_keys += [own.lease(db, h) for db, h in chunk]
            script_keys += [own.done(db, h) for db, h in chunk]
            args: list[str | int | bytes] = [token, self._lease_ms]
            if index_fields is None:
                args.append("0")
            else:
                script_keys += [own.index(db) for db, _ in chunk]
                args.append("1")
                args += index_fields[start : start + CHUNK]
            script_keys.append(own.stamp)
            reply = await self._acquire(self._r, script_keys, args)
            last = reply[0]
            tail = None if last is None else _text(last)
            stamp = int(reply[1])
            for i in range(2, len(reply), 3):
                if reply[i]:
                    done = reply[i + 1]
                    grants.append(
                        Grant(True, None if done is None else _text(done), reply[i + 2], stamp)
                    )
                else:
                    grants.append(Grant(False, None))
            start += CHUNK
            if start >= len(keys):
                return grants, tail

    async def renew(self, token: str, keys: Sequence[tuple[int, str]]) -> list[bool]:
        """Extend every ``(db, key_hash)`` lease still held with ``token`` by a full lease:
        one script call per :data:`CHUNK` keys. Returns, per key, whether it was still ours.

        The caller must leave out keys whose storage call is in flight (see the module
        docstring)."""
        ours: list[bool] = []
        for start in range(0, len(keys), CHUNK):
            leases = [self._own.lease(db, h) for db, h in keys[start : start + CHUNK]]
            ours += [bool(x) for x in await self._renew(self._r, leases, [token, self._lease_ms])]
        return ours

    async def release(self, token: str, items: Sequence[Release]) -> list[bool]:
        """Release leases held with ``token``, advancing done markers and updating the index:
        one script call per :data:`CHUNK` items; a lease no longer ours changes nothing.

        Returns, per item, whether the lease was still ours. ``False`` means another holder
        may have written the key since our read: the caller must redo the key.
        """
        own = self._own
        ours: list[bool] = []
        for start in range(0, len(items), CHUNK):
            keys: list[str] = []
            args: list[str | int | bytes] = [token, DONE_TTL_MS]
            for it in items[start : start + CHUNK]:
                keys += (
                    own.lease(it.db, it.key_hash),
                    own.done(it.db, it.key_hash),
                    own.index(it.db),
                )
                stored = it.stored
                if stored is None:
                    args += (it.done or "", "", "", "")
                elif stored.digest is None:
                    args += (it.done or "", "del", stored.key, "")
                else:
                    args += (it.done or "", "set", stored.key, stored.digest)
            ours += [bool(x) for x in await self._release(self._r, keys, args)]
        return ours


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
