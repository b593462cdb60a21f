"""A real Redis Cluster, one per test module: creating one takes seconds, so the cases of a
module share it (and leave it healthy, or restore it, for the next)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 masters with a replica each, node timeout 2 s; every node is killed at teardown."""
    with Cluster(tmp_path_factory.mktemp("cluster")).start() as started:
        yield started
