"""Shared fixtures: real redis-server processes, a moto S3 server, storage backends."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import structlog
from moto.server import ThreadedMotoServer

from tests.support.servers import RedisServer, free_port

S3_ACCESS_KEY = "testing-access"
S3_SECRET_KEY = "testing-secret-do-not-log"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Commands called in-process configure logging globally; each test starts afresh."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start ``redis-server`` processes; every one is stopped when the test ends."""
    servers: list[RedisServer] = []
    counter = itertools.count()

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{next(counter)}", *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """One fresh source Redis with keyspace notifications off, as a stock server has them."""
    return redis_factory()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server over HTTP on a free loopback port, for the whole session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


_bucket_counter = itertools.count()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new empty bucket on the moto server; S3_* variables point at it."""
    name = f"rrb-test-{next(_bucket_counter)}"
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    monkeypatch.setenv("S3_SERVER", moto_endpoint)
    monkeypatch.setenv("S3_ACCESS_KEY", S3_ACCESS_KEY)
    monkeypatch.setenv("S3_SECRET_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return name
