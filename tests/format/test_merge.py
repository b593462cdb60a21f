"""The streaming merge: order, policies, output parts, and damaged inputs."""

from __future__ import annotations

import pytest

from rrb_streams.format.builder import encode_segment
from rrb_streams.format.codec import KeyRecord
from rrb_streams.format.merge import DamagedInput, keep_all, keep_newest, merge
from rrb_streams.format.ranges import read_footer_of
from rrb_streams.format.segment import Footer, decode_segment, parse_segment_name
from rrb_streams.storage.base import ObjectInfo
from rrb_streams.storage.memory import MemoryStorage
from tests.compact.helpers import rec

pytestmark = pytest.mark.anyio


async def put(storage: MemoryStorage, name: str, records: list[KeyRecord]) -> tuple[str, Footer]:
    await storage.put(name, encode_segment(records, block_records=7))
    footer = await read_footer_of(storage, ObjectInfo(name, len(storage.objects[name])))
    return name, footer


def everything(storage: MemoryStorage, names: list[str]) -> list[KeyRecord]:
    out: list[KeyRecord] = []
    for name in names:
        _, blocks = decode_segment(storage.objects[name], name)
        for block in blocks:
            assert isinstance(block, list)
            out += block
    return out


async def test_merge_keeps_every_record_in_order_and_drops_exact_repeats() -> None:
    storage = MemoryStorage()
    a = [rec(b"k%02d" % i, 10 + i, 100 + i, b"a%d" % i) for i in range(0, 40, 2)]
    b = [rec(b"k%02d" % i, 60 + i, 200 + i, b"b%d" % i) for i in range(0, 40, 3)]
    inputs = [await put(storage, "in/a.seg", a), await put(storage, "in/b.seg", b)]
    repeat = await put(storage, "in/a2.seg", a)  # the same segment merged twice
    stats = await merge(
        storage, [[i] for i in (*inputs, repeat)], policy=keep_all, prefix="p/", level=1
    )
    assert stats.records_in == 2 * len(a) + len(b)
    assert stats.records_out == len(a) + len(b)
    out = everything(storage, [o.name for o in stats.outputs])
    keys = [(r.db, r.key, r.stamp, r.read_at_us) for r in out]
    assert keys == sorted(keys) and len(out) == len(a) + len(b)
    parsed = parse_segment_name(stats.outputs[0].name, "p/")
    assert parsed is not None and parsed.level == 1


async def test_keep_newest_keeps_one_record_per_key_and_drops_old_tombstones() -> None:
    storage = MemoryStorage()
    old = [rec(b"a", 1, 10, b"1"), rec(b"b", 2, 20, b"2"), rec(b"c", 3, 30, b"3")]
    new = [rec(b"a", 5, 50, b"5"), rec(b"b", 6, 60, None), rec(b"c", 7, 1_000, None)]
    inputs = [[await put(storage, "o.seg", old)], [await put(storage, "n.seg", new)]]
    stats = await merge(storage, inputs, policy=keep_newest(500), prefix="", level=3)
    out = everything(storage, [o.name for o in stats.outputs])
    # b's deletion is older than the window: gone; c's is recent: kept, in case an older
    # record of c lands later.
    assert [(r.key, r.payload, r.tombstone) for r in out] == [
        (b"a", b"5", False),
        (b"c", b"", True),
    ]
    assert stats.max_read_us == 1_000


async def test_merge_cuts_parts_between_keys() -> None:
    storage = MemoryStorage()
    records = [rec(b"k%04d" % i, i + 1, i + 1, b"x" * 200) for i in range(300)]
    records += [rec(b"k0100", 1000 + i, 1000 + i, b"y" * 200) for i in range(50)]
    inputs = [[await put(storage, "a.seg", records)]]
    stats = await merge(storage, inputs, prefix="", level=1, part_bytes=4096)
    assert len(stats.outputs) > 5
    seen: set[bytes] = set()
    for o in stats.outputs:
        keys = {r.key for r in everything(storage, [o.name])}
        assert not keys & seen  # no key's records are split between parts
        seen |= keys
    assert sum(o.records for o in stats.outputs) == len(records)


async def test_a_damaged_block_stops_the_merge_naming_its_object() -> None:
    storage = MemoryStorage()
    good = await put(storage, "good.seg", [rec(b"k%d" % i, i + 1, i + 1, b"v") for i in range(30)])
    bad = await put(storage, "bad.seg", [rec(b"j%d" % i, i + 1, i + 1, b"v") for i in range(30)])
    data = bytearray(storage.objects["bad.seg"])
    data[20] ^= 0xFF
    storage.objects["bad.seg"] = bytes(data)
    written: list[str] = []
    with pytest.raises(DamagedInput, match=r"bad\.seg") as info:
        await merge(storage, [[good], [bad]], prefix="", level=1, written=written)
    assert info.value.name == "bad.seg"
