"""A tiny HTTP/1.1 server for ``/metrics``, ``/healthz`` and ``/readyz``, inside the event loop.

It is meant for a Prometheus scraper and a probe, not for the open internet, but it must not
let either hurt the backup: one task per connection and at most :data:`MAX_CONNECTIONS` at a
time (more wait in the kernel's backlog), a request head of at most :data:`MAX_REQUEST`
bytes read within :data:`READ_TIMEOUT` seconds, one request per connection, then close.

- ``GET /metrics``: the Prometheus text format;
- ``GET /healthz``: ``200 ok`` while the process runs;
- ``GET /readyz``: ``200 ready`` when every readiness check passes, else ``503`` and the
  first failure in one line. Checks run at most once per :data:`READY_TTL` seconds, whoever
  asks, so probes and scrapes cannot hammer Redis or storage.

``HEAD`` answers as ``GET`` without the body; other methods get ``405``, other paths ``404``,
a malformed request ``400``, an oversized one ``431``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup
from prometheus_client import CONTENT_TYPE_LATEST

from rrb_streams.errors import DependencyError, RrbError
from rrb_streams.logs import get_logger
from rrb_streams.ops.metrics import Metrics

MAX_REQUEST = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
READY_TTL = 1.0  # seconds a readiness result is reused
CHECK_TIMEOUT = 2.0  # seconds one readiness check may take
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

#: One named readiness check: raises (any exception) when the dependency is not usable.
Check = tuple[str, Callable[[], Awaitable[None]]]


class BadRequest(Exception):
    """The request cannot be answered; ``status`` says why (400, 405 or 431)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, up to the blank line).

    Raises :class:`BadRequest` with 400 for a malformed request line, 405 for a method other
    than GET or HEAD, 431 when ``head`` is longer than :data:`MAX_REQUEST`.
    """
    if len(head) > MAX_REQUEST:
        raise BadRequest(431, f"request head over {MAX_REQUEST} bytes")
    line = head.split(b"\n", 1)[0].removesuffix(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith(b"/"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise BadRequest(400, "unsupported HTTP version")
    if not method.isalpha() or not method.isupper():
        raise BadRequest(400, "malformed method")
    if method not in (b"GET", b"HEAD"):
        raise BadRequest(405, f"method {method.decode()} not allowed")
    path = target.split(b"?", 1)[0]
    try:
        return Request(method.decode(), path.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "non-ASCII path") from exc


def response(status: int, body: bytes, content_type: str = _TEXT, *, head: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head else body)


class Readiness:
    """Runs ``checks`` in order and caches the verdict for ``ttl`` seconds.

    :meth:`reason` is ``None`` when all pass, else one line naming the first failure.
    Concurrent callers share one run of the checks.
    """

    def __init__(
        self, checks: Sequence[Check], *, ttl: float = READY_TTL, timeout: float = CHECK_TIMEOUT
    ) -> None:
        self._checks = list(checks)
        self._ttl = ttl
        self._timeout = timeout
        self._lock = anyio.Lock()
        self._at: float | None = None
        self._reason: str | None = None

    async def reason(self) -> str | None:
        async with self._lock:
            now = anyio.current_time()
            if self._at is None or now - self._at >= self._ttl:
                self._reason = await self._run()
                self._at = anyio.current_time()
            return self._reason

    async def _run(self) -> str | None:
        for name, check in self._checks:
            try:
                with anyio.fail_after(self._timeout):
                    await check()
            except TimeoutError:
                return f"{name}: no answer within {self._timeout:g} s"
            except Exception as exc:
                # Our own errors already name the dependency (and redact its URL).
                text = str(exc) if isinstance(exc, RrbError) else f"{name}: {exc}"
                return " ".join(text.split())[:300]
        return None


class MetricsServer:
    """Serves one process's metrics and health on a bound listener; see the module docstring."""

    def __init__(
        self, listeners: Sequence[SocketListener], metrics: Metrics, readiness: Readiness
    ) -> None:
        self._listeners = list(listeners)
        self._metrics = metrics
        self._readiness = readiness
        self._log = get_logger("metrics")

    @classmethod
    async def bind(
        cls, host: str, port: int, metrics: Metrics, readiness: Readiness
    ) -> MetricsServer:
        """Listen on ``host:port``. Raises ``DependencyError`` naming the address when it is
        in use or cannot be bound."""
        try:
            multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise DependencyError(
                f"cannot listen on {host}:{port} for --metrics-port: {exc.strerror or exc}"
            ) from exc
        # A name such as "localhost" may give one listener per address family.
        listeners = [x for x in multi.listeners if isinstance(x, SocketListener)]
        return cls(listeners, metrics, readiness)

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the one picked for port 0)."""
        return int(self._listeners[0].extra(SocketAttribute.local_port))

    async def serve(self) -> None:
        """Accept and answer connections until cancelled; then close the listeners."""
        limiter = anyio.Semaphore(MAX_CONNECTIONS)
        try:
            async with anyio.create_task_group() as tg:
                for listener in self._listeners:
                    tg.start_soon(self._accept, listener, limiter, tg)
        finally:
            with anyio.CancelScope(shield=True):
                for listener in self._listeners:
                    await listener.aclose()

    async def _accept(
        self, listener: SocketListener, limiter: anyio.Semaphore, tg: TaskGroup
    ) -> None:
        while True:
            # Taken before accepting: past the limit, clients wait in the kernel's backlog.
            await limiter.acquire()
            try:
                conn = await listener.accept()
            except BaseException:
                limiter.release()
                raise
            tg.start_soon(self._handle, conn, limiter)

    async def _handle(self, conn: SocketStream, limiter: anyio.Semaphore) -> None:
        try:
            async with conn:
                reply = await self._answer(conn)
                if reply is not None:
                    with anyio.move_on_after(WRITE_TIMEOUT):
                        await conn.send(reply)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._log.debug("metrics.connection_failed", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # A fault in answering one request must never stop the process's real work.
            self._log.error("metrics.request_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            limiter.release()

    async def _answer(self, conn: SocketStream) -> bytes | None:
        """The response to the connection's request; ``None`` when the client went away."""
        try:
            head = await _read_head(conn)
        except TimeoutError:
            return response(408, b"request not received in time\n")
        except BadRequest as exc:
            return response(exc.status, f"{exc}\n".encode())
        if head is None:
            return None
        try:
            req = parse_request(head)
        except BadRequest as exc:
            return response(exc.status, f"{exc}\n".encode())
        is_head = req.method == "HEAD"
        if req.path == "/metrics":
            return response(200, self._metrics.render(), CONTENT_TYPE_LATEST, head=is_head)
        if req.path == "/healthz":
            return response(200, b"ok\n", head=is_head)
        if req.path == "/readyz":
            reason = await self._readiness.reason()
            if reason is None:
                return response(200, b"ready\n", head=is_head)
            return response(503, f"{reason}\n".encode(), head=is_head)
        return response(404, b"not found\n", head=is_head)


async def _read_head(conn: SocketStream) -> bytes | None:
    """The bytes up to and including the blank line that ends the request head.

    ``None`` when the client closed first; raises ``TimeoutError`` after :data:`READ_TIMEOUT`
    and :class:`BadRequest` (431) past :data:`MAX_REQUEST` bytes.
    """
    data = b""
    with anyio.fail_after(READ_TIMEOUT):
        while True:
            end = _head_end(data)
            if end >= 0:
                return data[:end]
            if len(data) > MAX_REQUEST:
                raise BadRequest(431, f"request head over {MAX_REQUEST} bytes")
            try:
                data += await conn.receive(4096)
            except anyio.EndOfStream:
                return None


def _head_end(data: bytes) -> int:
    """Length of the request head at the start of ``data`` (through its blank line), or -1.
    Bare LF line ends count too: RFC 9112 lets a server accept them, and simple probes send
    them."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    return min(ends, default=-1)
