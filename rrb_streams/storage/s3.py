"""S3-compatible storage through aioboto3.

Only object calls are made: PutObject (and its multipart form), GetObject (whole or ranged),
ListObjectsV2 and DeleteObject. A policy granting ``s3:PutObject``, ``s3:GetObject``,
``s3:DeleteObject``, ``s3:ListBucket`` and ``s3:AbortMultipartUpload`` on the bucket is enough.
No ACL or bucket administration call is ever made, so the bucket must exist. With
``sse="aws:kms"`` the credentials also need ``kms:GenerateDataKey`` (writes) and
``kms:Decrypt`` (reads) on the key; ``docs/security.md`` has the policy.

botocore's errors are translated here, at the boundary:

=======================================================  =====================
NoSuchKey, 404 on an object                              ``ObjectNotFound``
NoSuchBucket                                             ``DependencyError``
AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch,
other 403s, missing credentials, clock skew              ``DependencyError``
connection errors, timeouts, 5xx, 429, SlowDown          ``StorageUnavailable``
any other 4xx                                            ``ObjectRejected``
=======================================================  =====================

A ranged GetObject answered 416 InvalidRange (its start is at or past the end) returns ``b""``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from rrb_streams.errors import (
    DependencyError,
    ObjectExists,
    ObjectNotFound,
    ObjectRejected,
    RrbError,
    StorageUnavailable,
)
from rrb_streams.logs import get_logger
from rrb_streams.storage.base import (
    Fetched,
    ObjectInfo,
    Storage,
    check_name,
    check_range,
    get_each,
    slice_range,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts, except the last one
MAX_PARTS = 10_000
_ABORT_TIMEOUT = 30.0

_REFUSED = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_TRANSIENT = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)


class S3Storage:
    """Objects under ``base`` in one bucket of an S3-compatible service.

    ``endpoint_url`` selects a non-AWS service (MinIO, moto, …); path-style addressing is
    used then, since such services rarely have per-bucket DNS names. Without ``access_key`` and
    ``secret_key`` the standard AWS credential chain applies.

    Keyword knobs: ``page_size`` (keys per ListObjectsV2 page), ``part_size`` and
    ``multipart_threshold`` (values larger than the threshold are sent in parts),
    ``max_connections`` (the HTTP pool; size it to the number of concurrent callers),
    ``max_attempts`` (tries per call, the first included), ``connect_timeout`` and
    ``read_timeout`` (seconds), ``sse`` (``ServerSideEncryption`` of every written object:
    ``AES256`` or ``aws:kms``) and ``sse_kms_key_id`` (with ``aws:kms``; else the bucket's
    default key).

    One client serves the backend's whole life: it is opened on first use and closed by
    :meth:`close`. Constructing the object opens nothing.
    """

    def __init__(
        self,
        bucket: str,
        base: str = "",
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        *,
        page_size: int = 1000,
        part_size: int = 8 * MiB,
        multipart_threshold: int | None = None,
        max_connections: int = 32,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
    ) -> None:
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be 1 to 1000, not {page_size}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE}, not {part_size}")
        parts = [p for p in base.split("/") if p]
        self.bucket = bucket
        self.base = "/".join(parts) + "/" if parts else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self.sse = sse
        self._write_args: dict[str, Any] = {"ContentType": "application/octet-stream"}
        if sse is not None:
            self._write_args["ServerSideEncryption"] = sse
        if sse_kms_key_id is not None:
            self._write_args["SSEKMSKeyId"] = sse_kms_key_id
        self.page_size = page_size
        self.part_size = part_size
        self.multipart_threshold = part_size if multipart_threshold is None else multipart_threshold
        self._config = AioConfig(
            # botocore's default "legacy" mode retries few error kinds with no retry budget.
            # "standard" retries throttling (SlowDown), 5xx and reset connections with jittered
            # exponential backoff and a retry quota that stops retry storms. Attempts stay few:
            # callers run their own capped backoff and keep the work pending, so an outage
            # should surface within seconds as StorageUnavailable rather than hide inside one
            # call for minutes.
            # (botocore's "max_attempts" here would count retries only; "total_max_attempts"
            # counts the first try too, as our knob does.)
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # A black-holed endpoint must fail fast; a slow one gets time to answer a part.
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore's default pool of 10 would silently queue the 11th concurrent call.
            max_pool_connections=max_connections,
            s3={"addressing_style": "path"} if endpoint_url else None,
            # botocore >= 1.36 adds CRC32 checksums to every request by default; several
            # S3-compatible servers (older MinIO, Ceph RGW, R2) reject them. Our objects carry
            # their own SHA-256, so send checksums only where the API requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._lock = anyio.Lock()
        self._log = get_logger("storage", backend="s3", bucket=bucket)

    @property
    def description(self) -> str:
        """``s3://bucket/base``."""
        return f"s3://{self.bucket}/{self.base}"

    @property
    def _endpoint(self) -> str:
        return self.endpoint_url or "AWS S3"

    def __repr__(self) -> str:
        credentials = "explicit" if self._secret_key else "default chain"
        return (
            f"S3Storage(bucket={self.bucket!r}, base={self.base!r}, "
            f"endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"sse={self.sse!r}, credentials={credentials!r})"
        )

    async def _get_client(self) -> S3Client:
        client = self._client
        if client is not None:
            return client
        async with self._lock:
            if (opened := self._client) is not None:
                return opened  # another task opened it while we waited
            session = aioboto3.Session(
                aws_access_key_id=self._access_key,
                aws_secret_access_key=self._secret_key,
                region_name=self.region,
            )
            stack = AsyncExitStack()
            new: S3Client = await stack.enter_async_context(
                session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
            )
            self._client, self._stack = new, stack
            self._log.debug("storage.client_opened", endpoint=self._endpoint)
            return new

    async def check(self) -> None:
        """Raise ``DependencyError`` naming the bucket (and the endpoint when unreachable)
        if the bucket is missing, unreachable, or refuses the credentials. Creates nothing."""
        try:
            client = await self._get_client()
            with self._translated(None):
                await client.list_objects_v2(Bucket=self.bucket, Prefix=self.base, MaxKeys=1)
        except DependencyError:
            raise
        except StorageUnavailable as exc:
            raise DependencyError(
                f"cannot reach S3 endpoint {self._endpoint} for bucket {self.bucket!r}: "
                f"{exc.__cause__ or exc}"
            ) from exc.__cause__
        except RrbError as exc:
            raise DependencyError(
                f"bucket {self.bucket!r} at {self._endpoint} is not usable: {exc}"
            ) from exc.__cause__

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as one object; multipart above ``multipart_threshold``.

        A failed or cancelled multipart upload is aborted, so no partial object appears.
        """
        check_name(name)
        client = await self._get_client()
        key = self.base + name
        if len(data) > self.multipart_threshold:
            part_size = max(self.part_size, -(-len(data) // MAX_PARTS))

            async def slices() -> AsyncIterator[bytes]:
                for start in range(0, len(data), part_size):
                    yield data[start : start + part_size]

            await self._put_multipart(client, name, key, slices())
            return
        with self._translated(name):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data, **self._write_args)

    async def put_new(self, name: str, data: bytes) -> None:
        """One PutObject with ``If-None-Match: *``: S3 answers 412 when the name is taken."""
        check_name(name)
        client = await self._get_client()
        with self._translated(name):
            await client.put_object(
                Bucket=self.bucket,
                Key=self.base + name,
                Body=data,
                IfNoneMatch="*",
                **self._write_args,
            )

    async def put_stream(self, name: str, chunks: Iterable[bytes]) -> None:
        """:meth:`put` of ``chunks``, gathered into parts of ``part_size`` as they come: one
        part in memory at a time. What fits under ``multipart_threshold`` is one PutObject."""
        check_name(name)
        it = iter(chunks)

        async def gather(size: int) -> tuple[bytes, bool]:
            """Up to about ``size`` bytes of chunks, and whether ``chunks`` ended."""
            got: list[bytes] = []
            total = 0
            while total < size:
                chunk = await anyio.to_thread.run_sync(next, it, None)
                if chunk is None:
                    return b"".join(got), True
                got.append(chunk)
                total += len(chunk)
            return b"".join(got), False

        first, ended = await gather(max(self.part_size, self.multipart_threshold))
        if ended and len(first) <= self.multipart_threshold:
            await self.put(name, first)
            return

        # One part at a time: nothing here keeps a part once it is handed over.
        pending: list[bytes] = [first]
        del first

        async def parts(ended: bool) -> AsyncIterator[bytes]:
            while pending:
                yield pending.pop()
                if ended:
                    return
                part, ended = await gather(self.part_size)
                if part:
                    pending.append(part)
                del part

        client = await self._get_client()
        await self._put_multipart(client, name, self.base + name, parts(ended))

    async def _put_multipart(
        self, client: S3Client, name: str, key: str, pieces: AsyncIterator[bytes]
    ) -> None:
        with self._translated(name):
            created = await client.create_multipart_upload(
                Bucket=self.bucket, Key=key, **self._write_args
            )
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            number = 0
            async for piece in pieces:
                number += 1
                if number > MAX_PARTS:
                    raise ObjectRejected(f"{name!r}: more than {MAX_PARTS} parts")
                with self._translated(name):
                    uploaded = await client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=piece,
                    )
                parts.append({"PartNumber": number, "ETag": uploaded["ETag"]})
                del piece  # not held while the next part is gathered
            with self._translated(name):
                await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
        except BaseException:
            # Also on cancellation: parts of an unfinished upload are billed until aborted.
            with anyio.move_on_after(_ABORT_TIMEOUT, shield=True):
                try:
                    await client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                except (BotoCoreError, ClientError) as exc:
                    self._log.warning("storage.multipart_abort_failed", name=name, error=repr(exc))
            raise

    async def get(self, name: str) -> bytes:
        """Return the object's bytes; ``ObjectNotFound`` naming it when absent."""
        client = await self._get_client()
        with self._translated(name):
            response = await client.get_object(Bucket=self.bucket, Key=self.base + name)
            async with response["Body"] as body:
                return await body.read()

    async def get_range(self, name: str, start: int, length: int) -> bytes:
        """One ranged GetObject: ``Range: bytes=start-end``, or ``bytes=-n`` for a negative
        start (the last ``n`` bytes; only the first ``length`` of them are returned)."""
        data, _ = await self._ranged(name, start, length)
        return data

    async def get_tail(self, name: str, length: int) -> tuple[bytes, int]:
        """One GetObject of ``Range: bytes=-length``; the size is Content-Range's total."""
        return await self._ranged(name, -length, length)

    async def _ranged(self, name: str, start: int, length: int) -> tuple[bytes, int]:
        check_range(name, length)
        client = await self._get_client()
        ranged = f"bytes={start}-{start + length - 1}" if start >= 0 else f"bytes={start}"
        with self._translated(name):
            try:
                response = await client.get_object(
                    Bucket=self.bucket, Key=self.base + name, Range=ranged
                )
            except ClientError as exc:
                if _invalid_range(exc):
                    # Start at or past the end (or an empty object): the size is in the
                    # error's Content-Range ("bytes */size") when the server sent one.
                    total = _total(exc.response.get("Error", {}).get("ActualObjectSize"))
                    return b"", total if total is not None else max(start, 0)
                raise
            async with response["Body"] as body:
                data = await body.read()
        if "ContentRange" not in response:
            # A server that ignored the range sent the whole object.
            return slice_range(data, start, length), len(data)
        total = _total(response["ContentRange"].rpartition("/")[2])
        return data[:length], len(data) if total is None else total

    async def get_many(self, names: Sequence[str]) -> list[Fetched]:
        return await get_each(self, names)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield objects under ``base + prefix`` in ascending order, one page in memory."""
        client = await self._get_client()
        skip = len(self.base)
        token: str | None = None
        while True:
            with self._translated(None):
                if token is None:
                    page = await client.list_objects_v2(
                        Bucket=self.bucket, Prefix=self.base + prefix, MaxKeys=self.page_size
                    )
                else:
                    page = await client.list_objects_v2(
                        Bucket=self.bucket,
                        Prefix=self.base + prefix,
                        MaxKeys=self.page_size,
                        ContinuationToken=token,
                    )
            for obj in page.get("Contents", []):
                name = obj["Key"][skip:]
                if name:  # the base itself, if someone made a "folder" object there
                    yield ObjectInfo(name, obj["Size"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def delete(self, name: str) -> None:
        """Remove the object; S3 answers success for an absent key, so this is idempotent."""
        client = await self._get_client()
        with self._translated(name):
            await client.delete_object(Bucket=self.bucket, Key=self.base + name)

    async def flush(self) -> None:
        """No-op: S3 has stored an object durably when the PUT returns."""
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Close the client and its connection pool. Idempotent."""
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
            if stack is not None:
                with anyio.CancelScope(shield=True):
                    await stack.aclose()

    @contextlib.contextmanager
    def _translated(self, name: str | None) -> Iterator[None]:
        """Turn botocore's errors into ours; ``name`` is the object concerned, if one is."""
        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, name) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise DependencyError(
                f"no usable S3 credentials for bucket {self.bucket!r}: set S3_ACCESS_KEY and "
                "S3_SECRET_KEY or configure the AWS credential chain"
            ) from exc
        except ParamValidationError as exc:
            raise ObjectRejected(f"{self._what(name)} rejected before sending: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(
                f"{self.description} unavailable at {self._endpoint}: {exc}"
            ) from exc

    def _what(self, name: str | None) -> str:
        return f"object {name!r} in {self.description}" if name else self.description

    def _client_error(self, exc: ClientError, name: str | None) -> RrbError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code == "NoSuchBucket":
            return DependencyError(f"bucket {self.bucket!r} does not exist at {self._endpoint}")
        if code in _REFUSED or status == 403:
            return DependencyError(
                f"credentials were refused for bucket {self.bucket!r} at {self._endpoint} "
                f"({code or status}: {message})"
            )
        if (code == "PreconditionFailed" or status == 412) and name is not None:
            return ObjectExists(f"an object named {name!r} exists in {self.description}")
        if code in ("NoSuchKey", "NotFound", "404") and name is not None:
            return ObjectNotFound(f"no object named {name!r} in {self.description}")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return StorageUnavailable(
                f"{self._what(name)} unavailable ({code or status}: {message})"
            )
        return ObjectRejected(f"{self._what(name)} rejected ({code or status}: {message})")


def _total(text: object) -> int | None:
    """The size in a Content-Range's ``/size`` (``None`` for ``*`` or nothing)."""
    return int(text) if isinstance(text, str) and text.isdigit() else None


def _invalid_range(exc: ClientError) -> bool:
    """Whether a ranged GET failed only because the range starts at or past the end."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error.get("Code") == "InvalidRange" or status == 416


_: Storage = S3Storage("x-bucket")
