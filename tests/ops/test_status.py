"""rrb-status's reading of the change stream, where Redis answers change between commands."""

from __future__ import annotations

from typing import Any

import pytest

from rrb_streams.ops.status import collect
from rrb_streams.wire.keys import OwnKeys

pytestmark = pytest.mark.anyio


class AckedBetweenCommands:
    """A stream Redis whose only pending entry is acked between XINFO GROUPS and XPENDING,
    as uploaders do all the time. A fake: the race is too narrow to hit on purpose."""

    async def xlen(self, key: str) -> int:
        return 0

    async def xinfo_stream(self, key: str) -> dict[str, Any]:
        return {"length": 3, "last-generated-id": b"1700000000000-2"}

    async def time(self) -> tuple[int, int]:
        return 1700000001, 0

    async def xinfo_groups(self, key: str) -> list[dict[str, Any]]:
        return [{"name": b"rrb-upload", "pending": 1, "lag": 0}]

    async def xpending(self, key: str, group: str) -> dict[str, Any]:
        return {"pending": 0, "min": None, "max": None, "consumers": []}

    async def xinfo_consumers(self, key: str, group: str) -> list[dict[str, Any]]:
        return []


async def test_collect_reads_a_pending_entry_acked_meanwhile_as_no_oldest() -> None:
    status = await collect(AckedBetweenCommands(), OwnKeys())  # type: ignore[arg-type]
    (group,) = status.groups
    assert (group.oldest_pending_id, group.oldest_pending_age_ms) == (None, None)
    assert group.pending == 1  # as XINFO GROUPS counted it
