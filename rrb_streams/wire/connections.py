"""Redis connections: the one place that turns a URL into a client.

Clients never decode responses (keys and DUMP payloads are raw bytes). Connection failures
surface as ``DependencyError`` with the URL, password masked.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from rrb_streams.errors import DependencyError
from rrb_streams.wire.tls import NO_TLS, TlsOptions, uses_tls
from rrb_streams.wire.urls import redact_url


def connect(
    url: str, *, db: int | None = None, name: str = "rrb", tls: TlsOptions = NO_TLS
) -> Redis:
    """A client for ``url`` (optionally another ``db``). Lazy: nothing connects until used.

    ``tls`` (CA, client certificate) applies when ``url`` is ``rediss://``.

    redis-py retries a failed command on a new connection three times, with backoff, so a
    blip does not surface; longer outages surface and our own loops back off.
    """
    client = Redis.from_url(
        url,
        decode_responses=False,
        client_name=name,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        **tls.connection_kwargs(url),
    )
    if db is not None:
        # from_url lets the URL's own database (``/0``) override a ``db`` argument, so a
        # client meant for db 3 would silently read db 0: set it on the pool instead.
        client.connection_pool.connection_kwargs["db"] = db
    return client


async def ping(r: Redis, url: str, what: str = "Redis") -> None:
    """Check ``r`` answers. Raises ``DependencyError`` naming the (redacted) URL when not."""
    try:
        await r.ping()
    except AuthenticationError as exc:
        raise DependencyError(f"{what} at {redact_url(url)} refused our credentials") from exc
    except ResponseError as exc:
        raise DependencyError(f"{what} at {redact_url(url)} refused PING: {exc}") from exc
    except (RedisError, OSError) as exc:
        raise DependencyError(
            f"cannot reach {what} at {redact_url(url)}: {exc}{_tls_hint(url, exc)}"
        ) from exc


def _tls_hint(url: str, exc: BaseException) -> str:
    # A TLS server that requires a client certificate refuses it after the handshake, with
    # an alert or a reset (whichever our first read meets): neither says what is missing.
    cause = exc.__cause__ or exc.__context__
    refused = isinstance(cause, ConnectionResetError) or "CERTIFICATE_REQUIRED" in str(exc)
    if uses_tls(url) and refused:
        return "; if the server requires a client certificate, give --tls-cert and --tls-key"
    return ""
