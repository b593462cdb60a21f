"""The manifest: its encoding, its checks, and its create-only commit."""

from __future__ import annotations

import hashlib

import pytest

from rrb_streams.errors import CorruptObject
from rrb_streams.format import manifest as mf
from rrb_streams.format.manifest import Entry, Manifest, Retired, Snapshot
from rrb_streams.storage.memory import MemoryStorage

pytestmark = pytest.mark.anyio


def sample(seq: int = 3) -> Manifest:
    return Manifest(
        seq=seq,
        written_us=1_700_000_000_000_000,
        writer="host-1-ab",
        objects=(
            Entry("segments/1/a.seg", 1, 100, 10, 1, 9, 5, 50, sealed=2),
            Entry("segments/3/b.seg", 3, 200, 20, 1, 9, 5, 50, snapshot=2),
            Entry("segments/0/c.seg", 0, 10, 0, 4, 4, 0, 0, damaged="checksum mismatch"),
        ),
        snapshots=(Snapshot(2, 50, 60, 20),),
        retired=(Retired("segments/0/d.seg", 70),),
        floor_us=40,
        last={"step": "snapshot", "inputs": 2},
        due={"level1": 1, "level2": 2, "snapshot": 3},
    )


def test_manifest_round_trips() -> None:
    m = sample()
    assert mf.decode(mf.encode(m), "x") == m


def test_manifest_is_one_json_line_and_its_checksum() -> None:
    line, digest = mf.encode(sample()).split(b"\n")
    assert line.startswith(b"{") and len(digest) == 64
    assert b'"format":"rrb-manifest"' in line and b'"version":1' in line


@pytest.mark.parametrize("where", [5, 100, -3])
def test_a_damaged_manifest_is_named(where: int) -> None:
    data = bytearray(mf.encode(sample()))
    data[where] ^= 0x01
    with pytest.raises(CorruptObject, match="manifest/x"):
        mf.decode(bytes(data), "manifest/x")


def test_a_manifest_of_another_version_is_refused() -> None:
    line = mf.encode(sample()).split(b"\n")[0].replace(b'"version":1', b'"version":9')
    data = line + b"\n" + hashlib.sha256(line).hexdigest().encode()
    with pytest.raises(CorruptObject, match="not a manifest of version 1"):
        mf.decode(data, "m")


def test_the_reading_base_is_the_newest_snapshot_cut_at_or_before_the_moment() -> None:
    m = Manifest(snapshots=(Snapshot(1, 100, 0, 0), Snapshot(2, 200, 0, 0)))
    assert m.base_for(None) == m.snapshots[1]
    assert m.base_for(250) == m.snapshots[1]
    assert m.base_for(199) == m.snapshots[0]
    assert m.base_for(99) is None


async def test_commit_creates_each_version_once_and_read_latest_finds_the_newest() -> None:
    storage = MemoryStorage()
    assert (await mf.read_latest(storage, "p/")).seq == 0
    assert await mf.commit(storage, "p/", sample(1))
    assert await mf.commit(storage, "p/", sample(1))  # a retry of the same bytes: ours
    other = Manifest(seq=1, writer="someone else")
    assert not await mf.commit(storage, "p/", other)  # the version is taken
    assert await mf.commit(storage, "p/", sample(2))
    assert (await mf.read_latest(storage, "p/")).seq == 2
    assert mf.is_manifest_name("p/manifest/00000000000000002.json", "p/")
    assert not mf.is_manifest_name("p/manifest/2.json", "p/")


async def test_read_latest_refuses_a_damaged_newest_version() -> None:
    storage = MemoryStorage()
    await mf.commit(storage, "", sample(1))
    await mf.commit(storage, "", sample(2))
    name = mf.manifest_name("", 2)
    storage.objects[name] = storage.objects[name][:-1] + b"0"
    with pytest.raises(CorruptObject, match=r"00000000000000002\.json"):
        await mf.read_latest(storage, "")


async def test_prune_keeps_the_newest_versions() -> None:
    storage = MemoryStorage()
    for seq in range(1, 12):
        await mf.commit(storage, "", sample(seq))
    assert await mf.prune(storage, "") == 11 - mf.KEEP_VERSIONS
    names = [seq for seq, _ in await mf.manifest_names(storage, "")]
    assert names == list(range(12 - mf.KEEP_VERSIONS, 12))
