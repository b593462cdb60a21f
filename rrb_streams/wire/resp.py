"""Batches of Redis commands sent and read straight on a redis-py connection, for hot paths.

redis-py's pipelines cost more per command than the command costs Redis: each one goes
through the client's encoder, and each reply through the whole client under a timeout of its
own. The bridge's XADDs and the uploaders' source reads run thousands of commands a second,
so here commands of bytes arguments are packed in one go, and their replies are read under
one shared deadline, the connection's socket timeout. Connection errors and timeouts are
retried as the client retries any command, so only commands that may run twice belong here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = tuple[bytes, ...]


_pack_command: Callable[[Command], bytes] | None
try:  # hiredis packs a command in C, at half the cost of the loop below
    import hiredis

    # Its stubs type the argument as a 1-tuple; it takes any tuple of bytes.
    _pack_command = hiredis.pack_command  # type: ignore[assignment]
except ImportError:  # pragma: no cover - redis-py without hiredis
    _pack_command = None


def pack(commands: Sequence[Command]) -> bytes:
    """``commands`` in the Redis protocol (RESP): arrays of bulk strings."""
    if _pack_command is not None:
        return b"".join([_pack_command(args) for args in commands])
    out = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]
    return b"".join(out)


async def pipeline(r: Redis, commands: Sequence[Command]) -> list[Any]:
    """Send ``commands`` at once on a connection of ``r``; their raw replies, in order, with
    a ``ResponseError`` in place of each command that failed (nothing is raised for them)."""

    async def run(conn: AbstractConnection) -> list[Any]:
        await conn.send_packed_command(pack(commands))
        return await _replies(conn, len(commands))

    return await _on_connection(r, run)


async def pipeline_packed(r: Redis, packed: bytes, count: int) -> list[Any]:
    """:func:`pipeline` of ``count`` commands the caller packed already (see :func:`pack`)."""

    async def run(conn: AbstractConnection) -> list[Any]:
        await conn.send_packed_command(packed)
        return await _replies(conn, count)

    return await _on_connection(r, run)


async def send_large(r: Redis, pieces: Sequence[bytes | memoryview]) -> Any:
    """Send one command given as ``pieces`` of its packed form, each written and drained
    before the next: a command carrying a value of hundreds of megabytes is never copied
    whole into a buffer. Returns its raw reply (a ``ResponseError`` value when it failed)."""

    async def run(conn: AbstractConnection) -> list[Any]:
        for piece in pieces:
            await conn.send_packed_command([piece], check_health=False)  # type: ignore[list-item]
        return await _replies(conn, 1)

    (reply,) = await _on_connection(r, run)
    return reply


class FastScript:
    """A Lua script run with ``EVALSHA`` through :func:`pipeline`: its arguments packed in one
    go, not encoded one by one as redis-py's ``Script`` does (a lease script of a batch carries
    a thousand of them). A server without the script in its cache (restarted, ``SCRIPT
    FLUSH``) gets it loaded, and the call made again, in one round trip."""

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()

    async def __call__(
        self, r: Redis, keys: Sequence[str | bytes], args: Sequence[str | int | bytes]
    ) -> Any:
        """The script's reply; raises its ``ResponseError`` (and connection errors)."""
        # Most arguments are bytes already: convert only the others.
        call = (
            b"EVALSHA",
            self.sha,
            b"%d" % len(keys),
            *[k if type(k) is bytes else _arg(k) for k in keys],
            *[a if type(a) is bytes else _arg(a) for a in args],
        )
        (reply,) = await pipeline(r, [call])
        if isinstance(reply, NoScriptError):
            loaded, reply = await pipeline(r, [(b"SCRIPT", b"LOAD", self.text), call])
            if isinstance(loaded, ResponseError):
                raise loaded
        if isinstance(reply, ResponseError):
            raise reply
        return reply


def _arg(value: str | int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b"%d" % value


async def transaction(r: Redis, commands: Sequence[Command]) -> list[Any]:
    """Run ``commands`` in one MULTI/EXEC on a connection of ``r``; EXEC's raw replies, with
    a ``ResponseError`` in place of each command that failed.

    A command refused while queueing (by an ACL, say) aborts the transaction and raises its
    ``ResponseError``. The ``QUEUED`` replies share the deadline; EXEC's reply, which holds
    all the data, has the connection's socket timeout to itself.
    """

    return await transaction_packed(r, pack(commands), len(commands))


_MULTI = pack([(b"MULTI",)])
_EXEC = pack([(b"EXEC",)])


async def transaction_packed(r: Redis, body: bytes, count: int) -> list[Any]:
    """:func:`transaction` of ``count`` commands the caller packed already (see :func:`pack`)."""

    async def run(conn: AbstractConnection) -> list[Any]:
        await conn.send_packed_command(_MULTI + body + _EXEC)
        queued = await _replies(conn, count + 1)  # MULTI's OK, then a QUEUED each
        refused = next((q for q in queued if isinstance(q, ResponseError)), None)
        try:
            replies = await conn.read_response()
        except ExecAbortError:
            if refused is not None:
                raise refused from None
            raise
        return list(replies)

    return await _on_connection(r, run)


try:  # redis-py's sentinel for "hiredis needs more bytes": its reader was made with it
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - a redis-py whose internals moved
    NOT_ENOUGH_DATA = None


def _hiredis_reader(conn: AbstractConnection) -> Any:
    """The connection's hiredis reader, or ``None`` (redis-py's own parser, or a redis-py
    whose internals moved: then every reply goes through ``read_response``)."""
    if NOT_ENOUGH_DATA is None:
        return None
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    return reader if callable(getattr(reader, "gets", None)) else None


def _take_buffered(reader: Any, out: list[Any], count: int) -> None:
    """Move the replies hiredis has parsed already into ``out``, up to ``count`` in all.

    A restore reads tens of thousands of ``OK`` replies per batch; through ``read_response``
    each costs a timeout context and a trip through the event loop, here a C call. Errors
    come back as exception values, as ``read_response`` gives them; a connection error
    (``LOADING``) is raised, as it would raise it.
    """
    while len(out) < count:
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            return
        if isinstance(reply, RedisConnectionError):
            raise reply
        out.append(reply)


async def _on_connection(r: Redis, run: Any) -> list[Any]:
    pool = r.connection_pool
    conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        result: list[Any] = await conn.retry.call_with_retry(
            lambda: run(conn), lambda _: conn.disconnect()
        )
        return result
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled caller must not leak the connection
            await pool.release(conn)


async def _replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies, error replies as ``ResponseError`` values."""
    limit = conn.socket_timeout
    out: list[Any] = []
    buffered = _hiredis_reader(conn)
    try:
        with anyio.fail_after(limit if limit is not None else math.inf):
            while len(out) < count:
                try:
                    # Cut off by the deadline, a read disconnects: nothing half-read stays on
                    # the connection.
                    out.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:
                    out.append(exc)
                if buffered is not None:
                    _take_buffered(buffered, out, count)
    except TimeoutError as exc:
        raise RedisTimeoutError(f"Redis sent no reply within {limit} s") from exc
    return out
