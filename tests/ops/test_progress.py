"""The restore's progress: a bar on a terminal, log lines otherwise."""

from __future__ import annotations

import io
from typing import Any

import anyio
import pytest

from rrb_streams.ops.progress import Progress

pytestmark = pytest.mark.anyio


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


async def test_the_bar_shows_done_of_total_rate_and_time_left() -> None:
    out = io.StringIO()
    p = Progress(tty=True, log=Log(), out=out)
    p.update(0, 10_000, listing_done=False)
    assert "0/10,000+ (listing)" in out.getvalue()
    await anyio.sleep(0.2)
    p.update(2_000, 10_000, listing_done=True)
    line = out.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert line.startswith("[####")
    assert "2,000/10,000 objects" in line and "20%" in line
    rate = p.rate()
    assert 5_000 < rate < 11_000  # 2,000 objects in about 0.2 s
    assert "/s" in line and "left" in line  # the total is known: an estimate is shown
    p.close()
    assert out.getvalue().endswith("\n")


async def test_without_a_terminal_progress_is_logged() -> None:
    log = Log()
    out = io.StringIO()
    p = Progress(tty=False, log=log, out=out)
    assert p.interval == 10.0
    p.update(5, 50, listing_done=False)
    p.close()
    assert out.getvalue() == ""
    event, fields = log.events[-1]
    assert event == "restore.progress"
    assert fields["done"] == 5 and fields["total"] == 50 and fields["seconds_left"] is None
