"""Progress of a long restore: a bar on a terminal, a log line now and then otherwise.

Both show objects done out of the total listed so far, the rate over the last few seconds,
and the time left once the listing is complete (before that the total is still growing, so
any estimate would be a guess).
"""

from __future__ import annotations

import collections
import sys
from typing import Any, TextIO

import anyio

WINDOW = 10.0  # seconds of samples the rate is measured over
BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Feed it :meth:`update` calls; it renders at most every ``interval`` seconds."""

    def __init__(
        self,
        *,
        tty: bool,
        log: Any,
        out: TextIO | None = None,
        event: str = "restore.progress",
        unit: str = "objects",
    ) -> None:
        """``event`` names the log lines off a terminal; ``unit`` is what the bar counts."""
        self.tty = tty
        self.event = event
        self.unit = unit
        self.interval = 0.5 if tty else 10.0
        self._log = log
        self._out = out or sys.stderr
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._drawn = False

    def rate(self) -> float:
        """Objects per second over the last ``WINDOW`` seconds."""
        if len(self._samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def update(self, done: int, total: int, *, listing_done: bool) -> None:
        """Record that ``done`` of ``total`` objects are done, and show it."""
        now = anyio.current_time()
        self._samples.append((now, done))
        while self._samples and now - self._samples[0][0] > WINDOW:
            self._samples.popleft()
        rate = self.rate()
        left = (total - done) / rate if listing_done and rate > 0 and done < total else None
        if self.tty:
            self._draw(done, total, rate, left, listing_done)
        else:
            self._log.info(
                self.event,
                done=done,
                total=total,
                listing_done=listing_done,
                per_second=round(rate),
                seconds_left=None if left is None else round(left),
            )

    def _draw(
        self, done: int, total: int, rate: float, left: float | None, listing_done: bool
    ) -> None:
        fraction = done / total if total else 0.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        of = f"{total:,}" if listing_done else f"{total:,}+ (listing)"
        eta = f"  {_duration(left)} left" if left is not None else ""
        line = f"[{bar}] {done:,}/{of} {self.unit}  {fraction:4.0%}  {rate:,.0f}/s{eta}"
        self._out.write("\r\x1b[K" + line)
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, so what follows starts on its own."""
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


class Throttled:
    """A :class:`Progress` fed at most once per its ``interval``, and always at the end."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._last = -float("inf")

    def update(self, done: int, total: int, *, listing_done: bool, final: bool = False) -> None:
        now = anyio.current_time()
        if final or now - self._last >= self.progress.interval:
            self._last = now
            self.progress.update(done, total, listing_done=listing_done)

    def close(self) -> None:
        self.progress.close()
