"""The moto S3 server of the tests (the ``moto_endpoint`` and ``s3_bucket`` fixtures): its
credentials, and clients of it: boto3, our backend, a storage spec, a command's environment."""

from __future__ import annotations

from typing import Any

import boto3

from rrb_streams.storage.s3 import S3Storage
from rrb_streams.storage.url import StorageSpec

S3_ACCESS_KEY = "testing-access"
S3_SECRET_KEY = "testing-secret-do-not-log"
REGION = "us-east-1"


def boto_client(endpoint: str) -> Any:
    """A boto3 S3 client of the moto server at ``endpoint``."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=REGION,
    )


def s3_spec(bucket: str, endpoint: str, base: str = "") -> StorageSpec:
    """``s3://bucket/base`` on the moto server at ``endpoint``."""
    return StorageSpec(
        kind="s3",
        bucket=bucket,
        base=base,
        endpoint_url=endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        region=REGION,
    )


def moto_storage(bucket: str, endpoint: str, base: str = "", **knobs: Any) -> S3Storage:
    """Our S3 backend on the moto server at ``endpoint``; ``knobs`` are further
    ``S3Storage`` arguments (``page_size``, ``max_attempts``…)."""
    return S3Storage(
        bucket,
        base=base,
        endpoint_url=endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        region=REGION,
        **knobs,
    )


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points a command's S3 storage at ``endpoint``."""
    return {
        "S3_SERVER": endpoint,
        "S3_ACCESS_KEY": S3_ACCESS_KEY,
        "S3_SECRET_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
