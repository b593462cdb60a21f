"""Storage URLs: which backend and where, from ``--storage`` and the environment.

=====================  ==========================================
``s3://bucket/base``   S3-compatible storage
``file:///abs/path``   the local filesystem
plain path             the local filesystem
=====================  ==========================================

The memory backend is for unit tests: no URL names it, so no backup can land there by mistake.

For S3 the endpoint comes from ``S3_SERVER``, then ``AWS_ENDPOINT_URL``, then AWS itself, and
credentials from ``S3_ACCESS_KEY``/``S3_SECRET_KEY``, then the standard AWS chain. With no
``--storage``, ``S3_BUCKET`` names the bucket; without it storage is ``./rrb-backup``.
Server-side encryption of written objects comes from ``--s3-sse``/``S3_SSE`` and
``--s3-sse-kms-key-id``/``S3_SSE_KMS_KEY_ID`` (see :func:`with_sse`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from rrb_streams.crypt.keys import AgeKeys
from rrb_streams.errors import ConfigError
from rrb_streams.storage.base import Storage
from rrb_streams.storage.encrypted import AgeStorage

DEFAULT_FOLDER = "rrb-backup"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageSpec:
    """A parsed storage location. ``repr`` never shows the secret key."""

    kind: Literal["s3", "fs"]
    bucket: str = ""
    base: str = ""  # for s3: a key prefix inside the bucket, "" or ending in "/"
    path: Path | None = None  # for fs
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    defaulted: bool = False  # True when no --storage or S3_BUCKET chose it
    sse: str | None = None  # S3 ServerSideEncryption of written objects: AES256 or aws:kms
    sse_kms_key_id: str | None = None  # with aws:kms: the key; None: the bucket's default
    age: AgeKeys = field(default_factory=AgeKeys)  # client-side encryption: see open_storage

    @property
    def description(self) -> str:
        """Where objects go, safe to log."""
        if self.kind == "s3":
            where = f"s3://{self.bucket}/{self.base}"
            return f"{where} at {self.endpoint_url}" if self.endpoint_url else where
        return f"file://{self.path}"


def _s3_spec(bucket: str, base: str, env: Mapping[str, str]) -> StorageSpec:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"invalid bucket name {bucket!r}: 3 to 63 characters of a-z, 0-9, '.' and '-'"
        )
    base_parts = [p for p in base.split("/") if p]
    if any(p in (".", "..") for p in base_parts):
        raise ConfigError(f"invalid storage prefix {base!r}")
    endpoint = env.get("S3_SERVER") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"invalid S3 endpoint {endpoint!r}: expected http:// or https://")
    return StorageSpec(
        kind="s3",
        bucket=bucket,
        base="/".join(base_parts) + "/" if base_parts else "",
        endpoint_url=endpoint,
        access_key=env.get("S3_ACCESS_KEY") or None,
        secret_key=env.get("S3_SECRET_KEY") or None,
        region=env.get("S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    )


def parse_storage_url(url: str | None, env: Mapping[str, str] | None = None) -> StorageSpec:
    """Parse ``--storage`` (or its absence) into a :class:`StorageSpec`.

    Raises ``ConfigError`` naming the bad value for an unknown scheme, a bad bucket name, or
    a ``file://`` URL with a host.
    """
    env = os.environ if env is None else env
    if not url:
        bucket = env.get("S3_BUCKET")
        if bucket:
            return _s3_spec(bucket, "", env)
        return StorageSpec(kind="fs", path=Path(DEFAULT_FOLDER).absolute(), defaulted=True)
    if "://" not in url:
        return StorageSpec(kind="fs", path=Path(url).expanduser().absolute())
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"invalid storage URL {url!r}: expected s3://bucket/prefix")
        return _s3_spec(parts.netloc, unquote(parts.path), env)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"invalid storage URL {url!r}: use file:///absolute/path")
        if not parts.path:
            raise ConfigError(f"invalid storage URL {url!r}: no path")
        return StorageSpec(kind="fs", path=Path(unquote(parts.path)))
    raise ConfigError(
        f"unknown storage scheme {parts.scheme!r} in {url!r}: use s3://, file:// or a path"
    )


SSE_MODES = ("AES256", "aws:kms")


def with_sse(
    spec: StorageSpec,
    sse: str | None = None,
    kms_key_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> StorageSpec:
    """``spec`` with server-side encryption from the flags, else ``S3_SSE`` and
    ``S3_SSE_KMS_KEY_ID``.

    Raises ``ConfigError`` for a mode other than ``AES256`` or ``aws:kms``, a KMS key id
    without ``aws:kms``, or either option with storage that is not S3.
    """
    env = os.environ if env is None else env
    sse = sse or env.get("S3_SSE") or None
    kms_key_id = kms_key_id or env.get("S3_SSE_KMS_KEY_ID") or None
    if sse is None and kms_key_id is None:
        return spec
    if spec.kind != "s3":
        raise ConfigError(
            f"--s3-sse and --s3-sse-kms-key-id (or S3_SSE, S3_SSE_KMS_KEY_ID) apply to s3:// "
            f"storage only, not {spec.description}"
        )
    if sse not in SSE_MODES:
        shown = "none" if sse is None else repr(sse)
        raise ConfigError(
            f"invalid --s3-sse (or S3_SSE) {shown}: expected {' or '.join(SSE_MODES)}"
        )
    if kms_key_id is not None and sse != "aws:kms":
        raise ConfigError(
            f"invalid --s3-sse-kms-key-id (or S3_SSE_KMS_KEY_ID) with --s3-sse {sse}: "
            "a KMS key needs --s3-sse aws:kms"
        )
    return replace(spec, sse=sse, sse_kms_key_id=kms_key_id)


def open_storage(spec: StorageSpec) -> Storage:
    """Build the backend for ``spec``, seen through its age keys (:class:`AgeStorage`: with
    no keys it still names an encrypted object it cannot read). Opens no connection yet;
    call ``check()`` next."""
    return AgeStorage(_backend(spec), spec.age)


def _backend(spec: StorageSpec) -> Storage:
    if spec.kind == "s3":
        from rrb_streams.storage.s3 import S3Storage

        return S3Storage(
            bucket=spec.bucket,
            base=spec.base,
            endpoint_url=spec.endpoint_url,
            access_key=spec.access_key,
            secret_key=spec.secret_key,
            region=spec.region,
            sse=spec.sse,
            sse_kms_key_id=spec.sse_kms_key_id,
        )
    from rrb_streams.storage.fs import FsStorage

    assert spec.path is not None
    return FsStorage(spec.path)
