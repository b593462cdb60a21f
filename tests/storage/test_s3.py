"""S3 backend specifics, on a moto server over HTTP."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from rrb_streams.errors import (
    DependencyError,
    ObjectExists,
    ObjectNotFound,
    ObjectRejected,
    StorageUnavailable,
)
from rrb_streams.storage.base import ObjectInfo
from rrb_streams.storage.s3 import S3Storage
from tests.support.moto import boto_client, moto_storage
from tests.support.servers import free_port

pytestmark = pytest.mark.anyio

BASE = "some/base/"


def make(bucket: str, endpoint: str, **knobs: Any) -> S3Storage:
    return moto_storage(bucket, endpoint, BASE, **knobs)


@pytest.fixture
async def storage(s3_bucket: str, moto_endpoint: str) -> AsyncIterator[S3Storage]:
    s = make(s3_bucket, moto_endpoint)
    yield s
    await s.close()


class SlowDownServer(ThreadingHTTPServer):
    """Answers the first ``failures`` requests with 503 SlowDown, then 200 to every PUT."""

    def __init__(self, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), _SlowDownHandler)
        self.failures = failures
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SlowDownHandler(BaseHTTPRequestHandler):
    server: SlowDownServer
    protocol_version = "HTTP/1.1"  # botocore sends "Expect: 100-continue"; 1.0 never answers it

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        if self.server.requests <= self.server.failures:
            body = (
                b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            )
            self.send_response(503)
        else:
            body = b""
            self.send_response(200)
            self.send_header("ETag", '"0"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request log per test request would bury the test output."""


@pytest.fixture
def slowdown_server() -> Iterator[Callable[[int], SlowDownServer]]:
    servers: list[SlowDownServer] = []

    def start(failures: int) -> SlowDownServer:
        server = SlowDownServer(failures)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


async def test_s3_retries_throttling_within_a_call(
    slowdown_server: Callable[[int], SlowDownServer],
) -> None:
    server = slowdown_server(1)
    storage = make("bkt", server.url, max_attempts=2)
    try:
        with anyio.fail_after(20):
            await storage.put("k", b"v")
    finally:
        await storage.close()
    assert server.requests == 2


async def test_s3_throttling_beyond_the_attempts_is_transient(
    slowdown_server: Callable[[int], SlowDownServer],
) -> None:
    server = slowdown_server(1)
    storage = make("bkt", server.url, max_attempts=1)
    try:
        with pytest.raises(StorageUnavailable, match="SlowDown"), anyio.fail_after(20):
            await storage.put("k", b"v")
    finally:
        await storage.close()
    assert server.requests == 1


def client_error(status: int, code: str, message: str = "msg") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


async def test_s3_check_names_a_missing_bucket(moto_endpoint: str) -> None:
    storage = make("rrb-no-such-bucket", moto_endpoint)
    try:
        with pytest.raises(DependencyError, match="'rrb-no-such-bucket' does not exist"):
            await storage.check()
    finally:
        await storage.close()


async def test_s3_check_names_an_unreachable_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    storage = make("rrb-bucket", endpoint, max_attempts=1, connect_timeout=2)
    try:
        with pytest.raises(DependencyError, match=f"cannot reach S3 endpoint {endpoint}") as info:
            await storage.check()
        assert "rrb-bucket" in str(info.value)
    finally:
        await storage.close()


async def test_s3_calls_to_an_unreachable_endpoint_are_transient() -> None:
    storage = make("rrb-bucket", f"http://127.0.0.1:{free_port()}", max_attempts=1)
    try:
        with pytest.raises(StorageUnavailable):
            await storage.put("k", b"v")
        with pytest.raises(StorageUnavailable):
            await storage.get("k")
        with pytest.raises(StorageUnavailable):
            [i async for i in storage.list()]
    finally:
        await storage.close()


async def test_s3_objects_live_under_base(storage: S3Storage, s3_bucket: str) -> None:
    await storage.put("db0/x.backup", b"v")
    s3 = boto_client(storage.endpoint_url or "")
    assert s3.get_object(Bucket=s3_bucket, Key=BASE + "db0/x.backup")["Body"].read() == b"v"
    s3.put_object(Bucket=s3_bucket, Key="some/basement", Body=b"outside")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/x", Body=b"outside")
    s3.put_object(Bucket=s3_bucket, Key=BASE, Body=b"")  # a console-made "folder"
    assert [i async for i in storage.list()] == [ObjectInfo("db0/x.backup", 1)]
    assert storage.description == f"s3://{s3_bucket}/{BASE}"


async def test_s3_base_is_normalised(moto_endpoint: str) -> None:
    for base in ("/some/base/", "some/base", "some//base/"):
        assert S3Storage("b-1", base, moto_endpoint).description == "s3://b-1/some/base/"
    assert S3Storage("b-1").description == "s3://b-1/"


async def test_s3_list_pages_at_the_real_page_size(storage: S3Storage, s3_bucket: str) -> None:
    # Seed 1,001 keys straight into the moto server's backend (same process): 1,001 PUTs
    # over HTTP would take seconds. The listing itself still goes over HTTP, in two pages.
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    names = [f"many/{i:05d}" for i in range(1001)]
    for name in names:
        backend.put_object(s3_bucket, BASE + name, b"x")
    assert storage.page_size == 1000
    assert [i.name async for i in storage.list("many/")] == names


async def test_s3_large_value_round_trips_through_multipart(
    storage: S3Storage, s3_bucket: str
) -> None:
    data = os.urandom(50 * 1024 * 1024)
    await storage.put("big", data)
    assert await storage.get("big") == data
    head = boto_client(storage.endpoint_url or "").head_object(Bucket=s3_bucket, Key=BASE + "big")
    assert head["ETag"].strip('"').endswith("-7")  # 7 parts of 8 MiB


async def test_s3_failed_multipart_upload_is_aborted_and_keeps_the_old_object(
    storage: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("big", b"old")
    client: Any = await storage._get_client()
    real = client.upload_part
    calls = 0

    async def flaky_upload_part(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise client_error(500, "InternalError")
        return await real(**kwargs)

    monkeypatch.setattr(client, "upload_part", flaky_upload_part)
    with pytest.raises(StorageUnavailable, match="'big'"):
        await storage.put("big", os.urandom(20 * 1024 * 1024))
    assert await storage.get("big") == b"old"
    uploads = boto_client(storage.endpoint_url or "").list_multipart_uploads(Bucket=s3_bucket)
    assert uploads.get("Uploads", []) == []


async def test_s3_cancelled_multipart_upload_is_aborted(
    storage: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client: Any = await storage._get_client()
    real = client.upload_part
    started = anyio.Event()

    async def slow_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            started.set()
            await anyio.sleep_forever()
        return await real(**kwargs)

    monkeypatch.setattr(client, "upload_part", slow_upload_part)
    async with anyio.create_task_group() as tg:
        tg.start_soon(storage.put, "big", os.urandom(12 * 1024 * 1024))
        await started.wait()
        tg.cancel_scope.cancel()
    uploads = boto_client(storage.endpoint_url or "").list_multipart_uploads(Bucket=s3_bucket)
    assert uploads.get("Uploads", []) == []
    with pytest.raises(ObjectNotFound):
        await storage.get("big")


def record_get_object(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record each GetObject call's arguments and its answer's ``ContentRange``."""
    seen: list[dict[str, Any]] = []
    real = client.get_object

    async def get_object(**kwargs: Any) -> Any:
        response = await real(**kwargs)
        seen.append({**kwargs, "ContentRange": response.get("ContentRange")})
        return response

    monkeypatch.setattr(client, "get_object", get_object)
    return seen


async def test_s3_get_range_sends_a_range_header_the_server_honours(
    storage: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1 << 20)
    await storage.put("seg/1", data)
    seen = record_get_object(await storage._get_client(), monkeypatch)
    assert await storage.get_range("seg/1", 1000, 300) == data[1000:1300]
    assert await storage.get_range("seg/1", -4096, 4096) == data[-4096:]
    assert await storage.get_range("seg/1", -4096, 10) == data[-4096:-4086]
    assert [(c["Key"], c["Range"], c["ContentRange"]) for c in seen] == [
        (BASE + "seg/1", "bytes=1000-1299", f"bytes 1000-1299/{len(data)}"),
        (BASE + "seg/1", "bytes=-4096", f"bytes {len(data) - 4096}-{len(data) - 1}/{len(data)}"),
        (BASE + "seg/1", "bytes=-4096", f"bytes {len(data) - 4096}-{len(data) - 1}/{len(data)}"),
    ]
    assert s3_bucket == seen[0]["Bucket"]


async def test_s3_get_range_past_the_end_is_empty_not_rejected(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("seg/1", b"0123456789")
    client: Any = await storage._get_client()
    real = client.get_object
    errors: list[str] = []

    async def get_object(**kwargs: Any) -> Any:
        try:
            return await real(**kwargs)
        except ClientError as exc:
            errors.append(exc.response["Error"]["Code"])
            raise

    monkeypatch.setattr(client, "get_object", get_object)
    assert await storage.get_range("seg/1", 10, 5) == b""
    assert await storage.get_range("seg/1", 11, 5) == b""
    assert errors == ["InvalidRange", "InvalidRange"]  # the server's 416, turned into b""


async def test_s3_get_range_of_a_server_that_ignores_ranges(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put("seg/1", b"0123456789")
    client: Any = await storage._get_client()
    real = client.get_object

    async def whole_object(**kwargs: Any) -> Any:
        kwargs.pop("Range")
        return await real(**kwargs)

    monkeypatch.setattr(client, "get_object", whole_object)
    assert await storage.get_range("seg/1", 2, 3) == b"234"
    assert await storage.get_range("seg/1", 8, 5) == b"89"
    assert await storage.get_range("seg/1", 10, 5) == b""
    assert await storage.get_range("seg/1", -4, 2) == b"67"
    assert await storage.get_range("seg/1", -40, 40) == b"0123456789"


async def test_s3_get_range_failures_are_translated(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    client: Any = await storage._get_client()
    error = client_error(503, "SlowDown")

    async def failing(**kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(client, "get_object", failing)
    with pytest.raises(StorageUnavailable, match="'seg/1'"):
        await storage.get_range("seg/1", 0, 10)
    error = client_error(403, "AccessDenied")
    with pytest.raises(DependencyError, match="credentials were refused"):
        await storage.get_range("seg/1", -10, 10)


async def test_s3_get_range_of_an_unreachable_endpoint_is_transient() -> None:
    storage = make("rrb-bucket", f"http://127.0.0.1:{free_port()}", max_attempts=1)
    try:
        with pytest.raises(StorageUnavailable):
            await storage.get_range("k", 0, 10)
    finally:
        await storage.close()


@pytest.mark.parametrize(
    ("status", "code", "expected", "text"),
    [
        (404, "NoSuchKey", ObjectNotFound, "no object named 'k'"),
        (404, "NoSuchBucket", DependencyError, "bucket 'bkt' does not exist"),
        (403, "AccessDenied", DependencyError, "credentials were refused for bucket 'bkt'"),
        (403, "InvalidAccessKeyId", DependencyError, "credentials were refused"),
        (403, "SignatureDoesNotMatch", DependencyError, "credentials were refused"),
        (503, "SlowDown", StorageUnavailable, "unavailable"),
        (500, "InternalError", StorageUnavailable, "unavailable"),
        (502, "", StorageUnavailable, "unavailable"),
        (429, "TooManyRequests", StorageUnavailable, "unavailable"),
        (400, "RequestTimeout", StorageUnavailable, "unavailable"),
        (400, "InvalidArgument", ObjectRejected, "'k'.*rejected"),
        (400, "EntityTooLarge", ObjectRejected, "rejected"),
        (412, "PreconditionFailed", ObjectExists, "'k' exists"),
    ],
)
async def test_s3_errors_are_translated(
    status: int, code: str, expected: type[Exception], text: str
) -> None:
    storage = S3Storage("bkt", endpoint_url="http://127.0.0.1:1", secret_key="s3cr3t")
    with pytest.raises(expected, match=text) as info:
        with storage._translated("k"):
            raise client_error(status, code)
    assert isinstance(info.value.__cause__, ClientError)
    assert "s3cr3t" not in str(info.value)


async def test_s3_repr_and_description_hide_the_secret() -> None:
    storage = S3Storage("bkt", "p/", "http://h:1", access_key="AK", secret_key="s3cr3t-value")
    assert "s3cr3t-value" not in repr(storage)
    assert "s3cr3t-value" not in storage.description
    assert "credentials='explicit'" in repr(storage)


async def test_s3_construction_opens_nothing() -> None:
    storage = S3Storage("bkt", endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert storage._client is None
    await storage.close()


async def test_s3_client_is_opened_once_and_shared(storage: S3Storage) -> None:
    clients = []

    async def grab() -> None:
        clients.append(await storage._get_client())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(grab)
    assert len({id(c) for c in clients}) == 1


def test_s3_refuses_parts_smaller_than_s3_allows() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Storage("bkt", part_size=1024)
    with pytest.raises(ValueError, match="page_size"):
        S3Storage("bkt", page_size=0)


async def test_s3_put_stream_sends_parts_as_they_fill(
    storage: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 MiB in 1 MiB chunks: three parts, each uploaded before the next is gathered, so no
    more than a part (and a chunk) is ever held."""
    chunk = os.urandom(1024 * 1024)
    client: Any = await storage._get_client()
    real = client.upload_part
    pulled = 0
    pulled_at_part: list[int] = []

    async def watched_upload_part(**kwargs: Any) -> Any:
        pulled_at_part.append(pulled)
        return await real(**kwargs)

    def chunks() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(20):
            pulled += 1
            yield chunk

    monkeypatch.setattr(client, "upload_part", watched_upload_part)
    await storage.put_stream("big", chunks())
    assert await storage.get("big") == chunk * 20
    head = boto_client(storage.endpoint_url or "").head_object(Bucket=s3_bucket, Key=BASE + "big")
    assert head["ETag"].strip('"').endswith("-3")  # 8 + 8 + 4 MiB
    assert pulled_at_part == [8, 16, 20]


async def test_s3_put_stream_below_the_threshold_is_one_put_object(
    storage: S3Storage, s3_bucket: str
) -> None:
    await storage.put_stream("small", iter([b"a" * 1000, b"b" * 1000]))
    head = boto_client(storage.endpoint_url or "").head_object(Bucket=s3_bucket, Key=BASE + "small")
    assert "-" not in head["ETag"]
    assert await storage.get("small") == b"a" * 1000 + b"b" * 1000


async def test_s3_put_stream_whose_chunks_fail_aborts_the_upload(
    storage: S3Storage, s3_bucket: str
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(12):
            yield os.urandom(1024 * 1024)
        raise ValueError("the encoder gave up")

    with pytest.raises(ValueError, match="the encoder gave up"):
        await storage.put_stream("big", chunks())
    uploads = boto_client(storage.endpoint_url or "").list_multipart_uploads(Bucket=s3_bucket)
    assert uploads.get("Uploads", []) == []
    with pytest.raises(ObjectNotFound):
        await storage.get("big")
