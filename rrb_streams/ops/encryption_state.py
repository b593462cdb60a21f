"""``rrb-status --storage``: which keys a backup's objects are encrypted to, without any secret.

Every stored object's first bytes are read (a ranged GET of 1 KiB each, a few at a time) and,
for an age file, its header parsed: the stanza types that wrap its file key (``X25519``) and
the recipients' fingerprints it names (:mod:`rrb_streams.crypt.keys`). Nothing is decrypted,
so it works without an identity. After a key rotation, a backup no object of which names the
old fingerprint no longer needs the old identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from rrb_streams.crypt import age
from rrb_streams.errors import CorruptObject, ObjectNotFound
from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.encrypted import AgeStorage

_HEAD_READ = 1024
_READERS = 16
UNENCRYPTED = "unencrypted"


@dataclass
class Encryption:
    """Objects (and stored bytes) per way they are encrypted: ``"age X25519 to fp1, fp2"``,
    :data:`UNENCRYPTED`, or ``"age, unreadable header"``."""

    kinds: dict[str, list[int]] = field(default_factory=dict)  # label: [objects, bytes]

    def add(self, label: str, size: int) -> None:
        tally = self.kinds.setdefault(label, [0, 0])
        tally[0] += 1
        tally[1] += size

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"objects": n, "bytes": b} for k, (n, b) in sorted(self.kinds.items())}


def label_of(header: age.Header) -> str:
    kinds = "+".join(sorted(set(header.kinds))) or "no recipient stanza"
    fingerprints = ", ".join(header.fingerprints)
    return f"age {kinds} to {fingerprints}" if fingerprints else f"age {kinds}"


async def collect_encryption(storage: Storage, infos: list[ObjectInfo]) -> Encryption:
    """How each object of ``infos`` is encrypted, from its header read as stored."""
    raw = storage.inner if isinstance(storage, AgeStorage) else storage
    found = Encryption()
    limiter = anyio.CapacityLimiter(_READERS)

    async def one(info: ObjectInfo) -> None:
        async with limiter:
            try:
                head = await raw.get_range(info.name, 0, _HEAD_READ) if info.size else b""
            except ObjectNotFound:
                return  # deleted since the listing
        if not age.is_encrypted(head):
            found.add(UNENCRYPTED, info.size)
            return
        try:
            found.add(label_of(age.parse_header(head, info.name)), info.size)
        except (age.NeedHeader, CorruptObject):
            found.add("age, unreadable header", info.size)

    async with anyio.create_task_group() as tg:
        for info in infos:
            tg.start_soon(one, info)
    return found


def render_encryption(found: Encryption) -> list[str]:
    """The human report's lines: none for a backup that is wholly unencrypted."""
    if set(found.kinds) <= {UNENCRYPTED}:
        return []
    lines = ["encryption (recipients' fingerprints):"]
    for label, (objects, size) in sorted(found.kinds.items()):
        lines.append(f"  {label}: {objects:,} object{'s' if objects != 1 else ''}, {size:,} bytes")
    return lines
