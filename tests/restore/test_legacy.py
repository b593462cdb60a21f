"""rrb-restore --format legacy: buckets of the original tool, written here by a tiny writer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from rrb_streams.errors import ConfigError
from rrb_streams.format.legacy import encode_legacy, legacy_name
from rrb_streams.restore.checks import require_versions
from rrb_streams.restore.planner import preview
from rrb_streams.restore.report import exit_status
from rrb_streams.storage.base import Storage
from rrb_streams.storage.url import StorageSpec
from tests.support.dataset import snapshot
from tests.support.restoring import (
    own_keys,
    restore,
    restore_config,
)
from tests.support.servers import RedisServer

Factory = Callable[..., RedisServer]
PREFIX = "my-keys/"
BASE = 1_700_000_000  # Unix seconds of the oldest version
AT = BASE + 20  # one version is stamped exactly at this second


@dataclass
class LegacyBucket:
    """What the original tool would have written, and what a restore must bring back."""

    objects: dict[str, bytes] = field(default_factory=dict)
    latest: dict[bytes, bytes] = field(default_factory=dict)  # restored without --at
    at: dict[bytes, bytes] = field(default_factory=dict)  # restored with --at AT

    def write(self, key: bytes, value: bytes, seconds: int | None = None) -> str:
        """The original tool's writer: one object per change, named by the key's hash."""
        name = legacy_name(key, seconds, PREFIX)
        self.objects[name] = encode_legacy(key, value)
        return name

    async def store(self, storage: Storage) -> None:
        for name, body in self.objects.items():
            await storage.put(name, body)
        await storage.flush()


def key_of_length(n: int) -> bytes:
    """A key of ``n`` bytes: binary for odd lengths, with '#' and digits for even ones."""
    if n % 2:
        return bytes((n * 31 + j * 7) % 256 for j in range(n))
    return (b"k%d#" % n + b"9#" * n)[:n]


def value_for(key: bytes, tag: bytes) -> bytes:
    return tag + b"#%d#" % len(key) + key[:5] + b"\x00\xff"


def legacy_bucket() -> LegacyBucket:
    """Keys of every length from 1 to 100 bytes, in four shapes of history."""
    b = LegacyBucket()
    for n in range(1, 101):
        key = key_of_length(n)
        assert len(key) == n and not key.startswith(b"rrb:")
        shape = n % 4
        if shape == 0:  # the default mode: one unversioned object
            b.write(key, value_for(key, b"only"))
            b.latest[key] = value_for(key, b"only")
        elif shape == 1:  # versioning: three versions, one exactly at AT
            for dt in (10, 20, 30):
                b.write(key, value_for(key, b"t%d" % dt), BASE + dt)
            b.latest[key] = value_for(key, b"t30")
            b.at[key] = value_for(key, b"t20")
        elif shape == 2:  # both modes: any version beats the unversioned object
            b.write(key, value_for(key, b"unversioned"))
            b.write(key, value_for(key, b"t10"), BASE + 10)
            b.write(key, value_for(key, b"t40"), BASE + 40)
            b.latest[key] = value_for(key, b"t40")
            b.at[key] = value_for(key, b"t10")
        else:  # one version after AT: absent at AT
            b.write(key, value_for(key, b"t21"), BASE + 21)
            b.latest[key] = value_for(key, b"t21")
    return b


def expected_in(db: int, values: dict[bytes, bytes]) -> dict[tuple[int, bytes], object]:
    return {(db, key): ("string", value, -1) for key, value in values.items()}


@pytest.mark.anyio
@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
async def test_legacy_restores_the_latest_value_of_keys_of_every_length(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    target = redis_factory()
    bucket = legacy_bucket()
    await bucket.store(storage)
    cfg = restore_config(target.url(3), spec, path_prefix=PREFIX, format="legacy")
    plan = await preview(cfg, storage, on_foreign=pytest.fail)
    assert (plan.stats.listed, plan.stats.keys) == (len(bucket.objects), 100)
    assert plan.stats.bytes == sum(len(encode_legacy(k, v)) for k, v in bucket.latest.items())
    report = await restore(cfg, storage)

    with target.client() as t:
        assert snapshot(t, 3) == expected_in(3, bucket.latest)
        assert snapshot(t, 0) == {}
        assert own_keys(t) == {}
    assert report.finished
    assert report.totals is not None
    tot = report.totals
    assert (tot["restored"], tot["failed"], tot["planned"]) == (100, 0, 100)
    assert tot["listed"] == len(bucket.objects)
    assert tot["bytes"] == sum(len(v) for v in bucket.latest.values())
    assert exit_status(report) == 0


@pytest.mark.anyio
async def test_legacy_at_restores_the_versions_at_or_before_it(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    target = redis_factory()
    bucket = legacy_bucket()
    await bucket.store(storage)
    cfg = restore_config(
        target.url(), spec, path_prefix=PREFIX, format="legacy", at_us=AT * 1_000_000
    )
    await require_versions(cfg, storage)
    plan = await preview(cfg, storage, on_foreign=pytest.fail)
    assert plan.stats.keys == len(bucket.at) == 50
    report = await restore(cfg, storage)

    with target.client() as t:
        assert snapshot(t) == expected_in(0, bucket.at)
        assert own_keys(t) == {}
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["failed"]) == (len(bucket.at), 0)
    assert len(bucket.at) == 50


@pytest.mark.anyio
async def test_legacy_at_without_timestamped_objects_is_refused(
    redis_server: RedisServer, spec: StorageSpec, storage: Storage
) -> None:
    b = LegacyBucket()
    b.write(b"k", b"v")
    await b.store(storage)
    cfg = restore_config(
        redis_server.url(), spec, path_prefix=PREFIX, format="legacy", at_us=AT * 1_000_000
    )
    with pytest.raises(ConfigError, match="--at needs a backup made with --versioning"):
        await require_versions(cfg, storage)


@pytest.mark.anyio
async def test_a_damaged_legacy_object_is_failed_and_named(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    target = redis_factory()
    b = LegacyBucket()
    for i in range(20):
        b.write(b"good:%d" % i, b"value %d" % i, BASE)
    # The newest version of each damaged key is damaged; an older good one must not be
    # restored in its place, or the target would silently go back in time.
    b.write(b"cut", b"old but fine", BASE)
    cut = b.write(b"cut", b"", BASE + 1)
    b.objects[cut] = encode_legacy(b"cut", b"this value was cut short")[:-4]
    garbage = b.write(b"garbage", b"", BASE + 1)
    b.objects[garbage] = b"\x89PNG\r\n\x1a\n not a backup at all"
    b.objects[PREFIX + "notes.txt"] = b"not an object of either format"
    # A bit flipped in the key: the body parses, but the key is not the name's.
    flipped = b.write(b"flip", b"value", BASE)
    b.objects[flipped] = encode_legacy(b"flop", b"value")
    await b.store(storage)
    with target.client() as t:
        t.set(b"cut", b"the target's value")

    cfg = restore_config(target.url(), spec, path_prefix=PREFIX, format="legacy")
    report = await restore(cfg, storage)

    assert report.totals is not None
    tot = report.totals
    assert (tot["restored"], tot["failed"], tot["foreign"]) == (20, 3, 1)
    reasons = dict(tot.failures)
    assert set(reasons) == {cut, garbage, flipped}
    assert reasons[flipped] == f"{flipped}: the key inside does not match the object's name"
    assert reasons[cut] == f"{cut}: header says 3+24 bytes follow, object has 23"
    assert reasons[garbage].startswith(f"{garbage}: not a legacy object")
    assert exit_status(report) == 3
    with target.client() as t:
        assert t.get(b"cut") == b"the target's value"
        assert t.exists(b"garbage") == 0
        assert t.exists(b"flip") == t.exists(b"flop") == 0
        assert {k for _, k in snapshot(t)} == {b"cut"} | {b"good:%d" % i for i in range(20)}
        assert own_keys(t) == {}


@pytest.mark.anyio
async def test_legacy_bucket_larger_than_a_plan_chunk(
    redis_factory: Factory, spec: StorageSpec, storage: Storage
) -> None:
    """Versions of one key spread over several planning chunks; a small stream bound."""
    target = redis_factory()
    b = LegacyBucket()
    for i in range(700):
        key = b"user:%d" % i
        for dt in (5, 1, 3):  # written out of order: the listing order is by hash anyway
            b.write(key, b"%d@%d" % (i, dt), BASE + dt)
        b.latest[key] = b"%d@5" % i
    cfg = restore_config(target.url(), spec, path_prefix=PREFIX, format="legacy", max_backlog=100)
    await b.store(storage)
    report = await restore(cfg, storage, within=60)
    with target.client() as t:
        assert snapshot(t) == expected_in(0, b.latest)
        assert own_keys(t) == {}
    assert report.totals is not None
    assert (report.totals["restored"], report.totals["listed"]) == (700, 2100)


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "kept"), [("skip", True), ("replace", False)])
async def test_legacy_if_exists(
    redis_factory: Factory, spec: StorageSpec, storage: Storage, mode: str, kept: bool
) -> None:
    target = redis_factory()
    b = LegacyBucket()
    b.write(b"a", b"from the backup")
    b.write(b"b", b"from the backup too")
    await b.store(storage)
    with target.client() as t:
        t.set(b"a", b"the target's", ex=1000)
    cfg = restore_config(target.url(), spec, path_prefix=PREFIX, format="legacy", if_exists=mode)
    report = await restore(cfg, storage)
    assert report.totals is not None
    counts = (report.totals["restored"], report.totals["existing"])
    assert counts == ((1, 1) if kept else (2, 0))
    with target.client() as t:
        assert t.get(b"a") == (b"the target's" if kept else b"from the backup")
        assert (t.ttl(b"a") > 0) == kept  # SET without KEEPTTL: the backup had no expiry
        assert t.get(b"b") == b"from the backup too"
