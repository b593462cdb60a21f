"""The compaction lease: one compactor at a time per backup, on the stream's Redis.

``{own}compact:lease`` holds the token of the process that compacts, taken with
``SET NX PX`` and renewed before every commit by a script that extends it only while it
holds that token. A compactor that finds another token stands by: it skips its pass.

The lease keeps compactors from working at the same time; it cannot by itself stop one that
was paused past its lease from writing to storage afterwards, since storage never asks
Redis. What does is the manifest's commit (:func:`rrb_streams.format.manifest.commit`): a
version can be created once, so a paused compactor whose successor committed anything finds
its version taken, commits nothing and deletes its outputs. Only a commit built on the newest
version can land, and that is a consistent one whoever makes it.
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from rrb_streams.wire.keys import OwnKeys, default_consumer

# KEYS: the lease. ARGV: token, lease ms. 1 when it is ours now (taken or extended), else 0.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease. ARGV: token, lease ms. 1 when it was still ours and is extended, else 0:
# a lapsed lease is not taken back, since another compactor may have worked meanwhile.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(own: OwnKeys) -> str:
    return own.name("compact:lease")


class CompactionLease:
    """One compactor's side of the lease. Methods raise Redis errors."""

    def __init__(self, r: Redis, own: OwnKeys, *, lease_s: float) -> None:
        self._r = r
        self._key = lease_key(own)
        self._ms = max(1, round(lease_s * 1000))
        self.token = f"{default_consumer()}-{secrets.token_hex(4)}"
        self._take = r.register_script(_TAKE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)

    async def take(self) -> bool:
        """Take the lease unless another compactor holds it."""
        return bool(await self._take(keys=[self._key], args=[self.token, self._ms]))

    async def renew(self) -> bool:
        """Extend it while it is still ours; ``False`` once another took it or it lapsed."""
        return bool(await self._renew(keys=[self._key], args=[self.token, self._ms]))

    async def holder(self) -> str | None:
        value = await self._r.get(self._key)
        return None if value is None else value.decode() if isinstance(value, bytes) else value

    async def release(self) -> None:
        await self._release(keys=[self._key], args=[self.token])
