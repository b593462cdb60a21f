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

**The stored-keys index.** The acquire also reads the key's field of the index
(:mod:`rrb_streams.index`), and the release script updates it, in the same token check as the
done marker: a holder that lost its lease leaves the index alone, and its redo writes whatever
the index says, because its stale write may have landed after the write the index describes.

**Residual case.** A storage write that the client gave up on (a timeout, a cancelled request,
a crashed process) but that the server still commits later can overwrite a newer object, and
nothing redoes it until the key next changes; a rescan does not either while the index holds
the newer digest. The writer never learns that the write landed, so no token check can catch
it. Storage timeouts shorter than the lease keep the window small, and ``rrb-verify`` finds
such keys. With ``--versioning`` a stale write cannot hide a newer version: every read has its
own object name.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from rrb_streams.changes import OwnKeys, id_tuple
from rrb_streams.index import Stored

DONE_TTL_MS = 10 * 60 * 1000  # long enough to cover any entry still in flight for the key

# KEYS: lease, done, index. ARGV: token, done id ("" to leave the marker), marker ttl ms,
# index action ("" leaves the index, "set" stores ARGV[6] under field ARGV[5], "del" removes
# the field), field, digest.
# Returns 1 when the token was still ours (lease released), 0 when the lease was lost.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[4] == 'set' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
elseif ARGV[4] == 'del' then
  redis.call('HDEL', KEYS[3], ARGV[5])
end
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
    stored: bytes | None = None  # the key's index value when held; None when not indexed

    def covers(self, entry_id: str) -> bool:
        """Whether ``entry_id``'s change is already in storage (valid only when held)."""
        return self.held and self.done is not None and id_tuple(entry_id) <= id_tuple(self.done)


@dataclass(frozen=True, slots=True)
class Release:
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
        self._release = r.register_script(_RELEASE)

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
        """Try to take every ``(db, key_hash)`` lease with ``token``, in one round trip.

        A lease that already holds ``token`` counts as taken: a retried pipeline, or a release
        that never arrived, must not make the holder wait out its own lease. Returns one
        :class:`Grant` per key and the stream's last entry id, read after the leases were
        taken (``None`` for an empty stream). Any entry at or below that id was added before
        the caller reads the source, so a successful write may cover it.

        ``index_fields`` (the raw keys, one per lease) also reads each key's index value into
        :attr:`Grant.stored`; only holders change it, so it stays valid while the lease does.
        """
        fields: list[bytes | None] = [None] * len(keys)
        if index_fields is not None:
            fields = list(index_fields)
        if len(fields) != len(keys):
            raise ValueError("index_fields must name one key per lease")
        pipe = self._r.pipeline(transaction=False)
        for (db, h), field in zip(keys, fields, strict=True):
            lease = self._own.lease(db, h)
            pipe.set(lease, token, nx=True, px=self._lease_ms)
            pipe.get(lease)
            pipe.get(self._own.done(db, h))
            if field is not None:
                pipe.hget(self._own.index(db), field)
        pipe.xrevrange(self._stream, "+", "-", count=1)
        replies = iter(await pipe.execute())
        grants = []
        for field in fields:
            _, holder, done = next(replies), next(replies), next(replies)
            stored = next(replies) if field is not None else None
            held = holder is not None and _text(holder) == token
            if not held:
                grants.append(Grant(False, None))
                continue
            grants.append(Grant(True, None if done is None else _text(done), stored))
        last = next(replies)
        tail = _text(last[0][0]) if last else None
        return grants, tail

    async def release(self, token: str, items: Sequence[Release]) -> list[bool]:
        """Release leases held with ``token``, advancing done markers and updating the index,
        in one round trip; a lease no longer ours changes nothing.

        Returns, per item, whether the lease was still ours. ``False`` means another holder
        may have written the key since our read: the caller must redo the key.
        """
        if not items:
            return []
        pipe = self._r.pipeline(transaction=False)
        for it in items:
            index: list[str | bytes] = [""]
            if it.stored is not None:
                digest = it.stored.digest
                index = ["del", it.stored.key] if digest is None else ["set", it.stored.key, digest]
            await self._release(
                keys=[
                    self._own.lease(it.db, it.key_hash),
                    self._own.done(it.db, it.key_hash),
                    self._own.index(it.db),
                ],
                args=[token, it.done or "", DONE_TTL_MS, *index],
                client=pipe,
            )
        return [bool(x) for x in await pipe.execute()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
