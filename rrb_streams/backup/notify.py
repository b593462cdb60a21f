"""Keyspace notifications: the flags the bridge needs, and the channels it listens on.

The bridge listens on keyspace channels (``K``) for every key-type class: ``g$lshzxet``, which
``A`` abbreviates. It never asks for key-miss (``m``) or new-key (``n``) events: they say
nothing about a key's stored state. Whatever flags the operator already set stay set.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rrb_streams.errors import NotificationsRefused

SETTING = "notify-keyspace-events"
KEYSPACE = "K"
CLASSES = "g$lshzxet"  # what "A" stands for, besides module keys ("d", Redis 7.0+)
_ALL = "A"
_CHANNEL_PREFIX = b"__keyspace@"
_GLOB_SPECIAL = "\\*?[]^-"  # backslash-escaped in patterns, inside brackets or out


def _present(current: str) -> set[str]:
    have = set(current)
    if _ALL in have:
        have.update(CLASSES)
    return have


def missing_flags(current: str) -> str:
    """The flags of ``K`` + ``g$lshzxet`` that ``current`` lacks, in that order ("" if none)."""
    have = _present(current)
    return "".join(flag for flag in KEYSPACE + CLASSES if flag not in have)


def extended_flags(current: str) -> str:
    """``current`` with the missing flags appended: nothing already set is dropped."""
    return current + missing_flags(current)


def suggested_value(current: str | None) -> str:
    """The value to put in redis.conf: ``KA`` plus whatever else ``current`` sets (E, m, n)."""
    kept = "".join(f for f in (current or "") if f not in KEYSPACE + _ALL + CLASSES + "d")
    return KEYSPACE + _ALL + kept


def _refused(current: str | None, exc: ResponseError) -> NotificationsRefused:
    keep = "" if current is not None else " (keep any flags already set)"
    return NotificationsRefused(
        f"the source Redis refused CONFIG ({exc}): set '{SETTING} {suggested_value(current)}'"
        f"{keep} in its redis.conf or the provider's parameter group, then run again, with "
        "--assume-notifications if CONFIG stays blocked"
    )


async def ensure_notifications(r: Redis) -> str | None:
    """Make sure ``r`` publishes every keyspace event the bridge needs.

    Reads ``notify-keyspace-events`` and, only when a needed flag is missing, sets it to the
    current value plus the missing flags. Returns the new value, or ``None`` when nothing had
    to change. Raises ``NotificationsRefused`` (naming the setting to add) when the server
    refuses CONFIG: renamed, disabled, or not allowed by ACL.
    """
    try:
        reply = await r.config_get(SETTING)
    except ResponseError as exc:
        raise _refused(None, exc) from exc
    current = str(reply.get(SETTING) or "")  # redis-py decodes CONFIG GET replies to str
    # Redis 7.0's CONFIG GET omits "n" even when it is set, so re-setting from the reply would
    # drop it; that cannot be seen from here, hence SET only when something is really missing.
    if not missing_flags(current):
        return None
    value = extended_flags(current)
    try:
        await r.config_set(SETTING, value)
    except ResponseError as exc:
        raise _refused(current, exc) from exc
    return value


def channel_pattern(db: int | None, pattern: str) -> str:
    """The PSUBSCRIBE pattern for keys matching ``pattern`` in ``db`` (``None``: every db)."""
    return f"__keyspace@{'*' if db is None else db}__:{pattern}"


def channel_patterns(db: int | None, pattern: str, own_prefix: str) -> list[str]:
    """The PSUBSCRIBE patterns for keys matching ``pattern`` in ``db`` (``None``: every db).

    For ``*`` their union is every key except those starting with ``own_prefix``: uploaders
    write several of rrb's own keys for every key they back up, and the source then publishes
    none of those events to the bridge. With prefix ``p`` of ``n`` characters that takes ``2n``
    disjoint patterns: for each ``i < n``, keys equal to ``p[:i]``, and keys that start with
    ``p[:i]`` followed by any character but ``p[i]``. Any other pattern, or a prefix that is
    not ASCII (the glob matches bytes), gives the one pattern of :func:`channel_pattern`.

    With ``db`` ``None`` the ``*`` in the db part can also span a ``__:`` inside a key, so a
    key holding ``__:`` may match two patterns and come twice: harmless, uploaders merge
    repeated keys.
    """
    if pattern != "*" or not own_prefix or not own_prefix.isascii():
        return [channel_pattern(db, pattern)]
    head = channel_pattern(db, "")
    escaped = ["\\" + c if c in _GLOB_SPECIAL else c for c in own_prefix]
    patterns = []
    for i in range(len(own_prefix)):
        before = "".join(escaped[:i])
        patterns.append(head + before)
        patterns.append(f"{head}{before}[^{escaped[i]}]*")
    return patterns


def parse_channel(channel: bytes) -> tuple[int, bytes] | None:
    """``(db, raw key)`` from a keyspace channel name, or ``None`` if it is not one."""
    if not channel.startswith(_CHANNEL_PREFIX):
        return None
    db_text, sep, key = channel[len(_CHANNEL_PREFIX) :].partition(b"__:")
    if not sep or not db_text.isdigit():
        return None
    return int(db_text), key
