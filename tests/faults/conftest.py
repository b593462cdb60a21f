"""The fault scenarios' report: what each injected, the differences found, the drain time.

Each scenario adds a row through the ``fault_report`` fixture; the rows are printed at the end
of the run, so CI's log carries the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_ROWS: list[dict[str, Any]] = []


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``fault_report(injected=…, differences=…, drain_seconds=…, **details)``."""

    def add(**row: Any) -> None:
        _ROWS.append({"scenario": request.node.name, **row})

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    terminalreporter.section("fault injection report")
    for row in _ROWS:
        terminalreporter.write_line("  ".join(f"{k}={v}" for k, v in row.items()))
