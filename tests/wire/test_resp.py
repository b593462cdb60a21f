"""Hot-path pipelines and transactions against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rrb_streams.wire.resp import pack, pipeline, transaction
from tests.support.servers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Redis]:
    # A short socket timeout and no retries, so a missing reply fails fast.
    client = Redis.from_url(redis_server.url(), socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


def test_resp_packs_commands_as_redis_py_does() -> None:
    commands = [(b"MULTI",), (b"DUMP", b""), (b"TYPE", b"bin\x00\r\n\xff" * 3000), (b"EXEC",)]
    packed = Connection().pack_commands(commands)
    assert pack(commands) == b"".join(bytes(chunk) for chunk in packed)


async def test_resp_pipeline_puts_errors_in_place_of_their_replies(r: Redis) -> None:
    await r.set("s", "v")
    replies = await pipeline(r, [(b"GET", b"s"), (b"LPUSH", b"s", b"x"), (b"INCR", b"n")])
    assert replies[0] == b"v" and replies[2] == 1
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    assert await r.get("s") == b"v"  # the connection is still in step


async def test_resp_transaction_runs_atomically_with_errors_in_place(r: Redis) -> None:
    await r.set("s", "v")
    replies = await transaction(r, [(b"INCR", b"s"), (b"SET", b"t", b"1"), (b"GET", b"t")])
    assert isinstance(replies[0], ResponseError) and replies[1:] == [b"OK", b"1"]
    with pytest.raises(ResponseError, match="wrong number of arguments"):
        await transaction(r, [(b"SET", b"u", b"1"), (b"GET",)])  # refused while queueing
    assert await r.exists("u") == 0 and await r.get("t") == b"1"


@pytest.mark.parametrize("how", ["pipeline", "transaction"])
async def test_resp_without_replies_times_out_and_the_client_recovers(
    r: Redis, redis_server: RedisServer, how: str
) -> None:
    run = pipeline if how == "pipeline" else transaction
    await r.set("k", "v")
    assert await run(r, [(b"GET", b"k")]) == [b"v"]  # connected before the pause
    await r.execute_command("CLIENT", "PAUSE", "1000", "ALL")
    started = anyio.current_time()
    with pytest.raises(RedisTimeoutError):
        await run(r, [(b"GET", b"k"), (b"TYPE", b"k")])
    assert anyio.current_time() - started < 0.9
    await anyio.sleep(1.0)
    assert await run(r, [(b"GET", b"k"), (b"TYPE", b"k")]) == [b"v", b"string"]


async def test_resp_many_replies_over_many_reads_stay_in_step(r: Redis) -> None:
    """Tens of thousands of replies arrive over many socket reads: each is taken once, in
    order, errors in place, and the connection is in step for the next command."""
    n = 30_000
    commands = [(b"INCR", b"n") if i % 1000 else (b"LPUSH", b"s", b"x") for i in range(n)]
    await r.set("s", "v")
    for _ in range(2):  # the second time on the same connection, after the first
        replies = await pipeline(r, commands)
        assert len(replies) == n
        errors = [i for i, x in enumerate(replies) if isinstance(x, ResponseError)]
        assert errors == list(range(0, n, 1000))
        counts = [x for x in replies if not isinstance(x, ResponseError)]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert await r.get("n") == str(2 * (n - n // 1000)).encode()
    assert await pipeline(r, [(b"GET", b"s")]) == [b"v"]


def test_entry_pairs_are_the_fields_of_entry_fields_in_order() -> None:
    from rrb_streams.wire.entries import entry_fields, entry_pairs

    fields = entry_fields(3, b"k\x00\xff", "del", 1_796_000_000_123)
    assert entry_pairs(3, b"k\x00\xff", "del", 1_796_000_000_123) == tuple(
        x for pair in fields.items() for x in pair
    )
