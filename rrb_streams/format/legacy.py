"""Objects of the original tool, realtime-redis-backup, read by ``rrb-restore --format legacy``.

Names sit directly under the prefix ``P`` (``""`` or ending in ``/``), one per key::

    P{h}.backup                 unversioned: the key's latest value
    P{seconds}.{h}.backup       versioned: the value at Unix time ``seconds``

``h`` is 64 lowercase hex digits, the SHA-256 of the raw key bytes; ``seconds`` is 1 to 20
ASCII decimal digits. Nothing else is a legacy name: no further ``/``, no uppercase hex, no
other digits, no other suffix.

A body is the key and its value as raw bytes behind a two-number header::

    {len(key)}#{len(value)}#{key}{value}

Each length is 1 to 20 ASCII decimal digits, with no sign and no spaces. The key and value
follow at once, may hold ``#`` and any other byte, and the object ends right after the value.
The value is a plain string: the original tool backed up string keys only, with no expiry.

The original tool cut the header at the wrong ``#`` for keys of 10 bytes or more; this reader
takes the lengths from the header and requires the object's size to be exactly the header
plus both lengths. Anything else raises ``CorruptObject`` naming the object.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from rrb_streams.errors import CorruptObject

_NAME = re.compile(r"(?:(?P<seconds>[0-9]{1,20})\.)?(?P<hash>[0-9a-f]{64})\.backup", re.ASCII)
# Bounded repetition: a body that does not start with a header is rejected after 42 bytes.
_HEADER = re.compile(rb"(?P<klen>[0-9]{1,20})#(?P<vlen>[0-9]{1,20})#", re.ASCII)


@dataclass(frozen=True, slots=True)
class LegacyName:
    """What a legacy object's name says: whose key, and which version (None: unversioned)."""

    key_hash: str
    seconds: int | None


def parse_legacy_name(name: str, prefix: str = "") -> LegacyName | None:
    """Parse ``name`` as a legacy object directly under ``prefix``; None if it is not one.

    ``prefix`` is already normalized (``""`` or ending in ``/``).
    """
    if not name.startswith(prefix):
        return None
    m = _NAME.fullmatch(name, len(prefix))
    if m is None:
        return None
    seconds = m["seconds"]
    return LegacyName(m["hash"], None if seconds is None else int(seconds))


def legacy_name(key: bytes, seconds: int | None = None, prefix: str = "") -> str:
    """The name the original tool gave ``key`` (versioned when ``seconds`` is given)."""
    h = hashlib.sha256(key).hexdigest()
    return f"{prefix}{h}.backup" if seconds is None else f"{prefix}{seconds}.{h}.backup"


def encode_legacy(key: bytes, value: bytes) -> bytes:
    """A body as the original tool wrote it."""
    return b"%d#%d#%s%s" % (len(key), len(value), key, value)


def decode_legacy(data: bytes, name: str = "<object>") -> tuple[bytes, bytes]:
    """Parse a body into ``(key, value)``. Raises ``CorruptObject`` naming ``name``."""
    if not data:
        raise CorruptObject(f"{name}: empty object")
    m = _HEADER.match(data)
    if m is None:
        raise CorruptObject(f"{name}: not a legacy object (no '<key length>#<value length>#')")
    klen, vlen, start = int(m["klen"]), int(m["vlen"]), m.end()
    if len(data) - start != klen + vlen:
        raise CorruptObject(
            f"{name}: header says {klen}+{vlen} bytes follow, object has {len(data) - start}"
        )
    return data[start : start + klen], data[start + klen :]
