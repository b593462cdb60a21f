"""Shared fixtures: real redis-server processes, a moto S3 server, storage backends, our
commands as processes."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from moto.server import ThreadedMotoServer

from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from tests.support.moto import boto_client, s3_env, s3_spec
from tests.support.proc import Command
from tests.support.restoring import fs_spec, opened
from tests.support.servers import RedisServer, free_port


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
    boto_client(moto_endpoint).create_bucket(Bucket=name)
    for variable, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(variable, value)
    return name


@pytest.fixture
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSpec:
    """Where the test's backup is kept: the folder ``tmp_path / "backup"``, or, parametrized
    indirectly with ``"s3"``, a fresh bucket on the moto server under ``base/``."""
    if getattr(request, "param", "fs") == "fs":
        return fs_spec(tmp_path / "backup")
    bucket: str = request.getfixturevalue("s3_bucket")
    return s3_spec(bucket, request.getfixturevalue("moto_endpoint"), base="base/")


@pytest.fixture
async def storage(spec: StorageSpec) -> AsyncIterator[Storage]:
    """The backend ``spec`` names, built as the commands build it; closed at the end."""
    async with opened(spec) as backend:
        yield backend


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    """Commands the test started (append them): each is stopped when the test ends."""
    started: list[Command] = []
    yield started
    for c in started:
        c.ensure_stopped()
