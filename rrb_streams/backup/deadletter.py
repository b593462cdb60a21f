"""The dead-letter stream: change entries that kept failing, kept with their reason.

An entry moves there after ``max_attempts`` failures that retrying does not fix (storage
rejected the object, the source refused to read the key) or at once when it cannot be parsed.
Each dead letter is the original entry's fields plus::

    entry     the original entry id
    reason    why it failed, one line
    attempts  how many times it was tried
    consumer  the uploader that gave up on it

Nothing trims the dead-letter stream: an operator reads it (``rrb-status`` counts it), fixes the
cause and re-adds the entries, or deletes them on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One change entry to move to the dead letters."""

    entry_id: str
    fields: Mapping[bytes, bytes]
    reason: str
    attempts: int


async def move(
    r: Redis, *, dead: str, stream: str, group: str, consumer: str, letters: Sequence[DeadLetter]
) -> None:
    """Add every letter to ``dead`` and acknowledge its entry in ``stream``, atomically.

    One MULTI/EXEC, so an entry is never acknowledged without its dead letter.
    """
    if not letters:
        return
    pipe = r.pipeline(transaction=True)
    for d in letters:
        fields = dict(d.fields)
        fields.update(
            {
                b"entry": d.entry_id.encode(),
                b"reason": d.reason.encode(errors="replace"),
                b"attempts": b"%d" % d.attempts,
                b"consumer": consumer.encode(),
            }
        )
        pipe.xadd(dead, fields)  # type: ignore[arg-type]
    pipe.xack(stream, group, *(d.entry_id for d in letters))
    await pipe.execute()
