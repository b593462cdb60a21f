"""The compaction lease on a real Redis: one holder, renewals only while held."""

from __future__ import annotations

import anyio
import pytest

from rrb_streams.compact.lease import CompactionLease, lease_key
from rrb_streams.wire.connections import connect
from rrb_streams.wire.keys import OwnKeys
from tests.support.servers import RedisServer

pytestmark = pytest.mark.anyio


async def test_one_holder_at_a_time_and_a_lapsed_lease_is_not_taken_back(
    redis_server: RedisServer,
) -> None:
    r = connect(redis_server.url())
    try:
        own = OwnKeys("rrb:")
        a = CompactionLease(r, own, lease_s=0.3)
        b = CompactionLease(r, own, lease_s=0.3)
        assert await a.take()
        assert await a.take()  # ours already: extended
        assert not await b.take()
        assert await b.holder() == a.token
        assert await a.renew()
        await anyio.sleep(0.5)  # a was paused past its lease; b takes over
        assert await b.take()
        assert not await a.renew()  # a must not commit any more
        await a.release()  # not ours: left alone
        assert await r.get(lease_key(own)) == b.token.encode()
        await b.release()
        assert await r.get(lease_key(own)) is None
        assert a.token != b.token and a.token.count("-") >= 2
    finally:
        await r.aclose()
