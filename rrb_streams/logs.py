"""Logging: structlog key/value events with stable names, and the one way to show a key.

A friendly console renderer on a TTY, JSON lines otherwise. ``LOG_LEVEL`` sets the level;
``--debug`` forces DEBUG and ``-q`` shows warnings and errors only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def configure(
    *,
    debug: bool = False,
    quiet: bool = False,
    json: bool | None = None,
    default_level: str = "INFO",
) -> None:
    """Set up structlog for a command. Call once, before anything logs.

    ``default_level`` applies when neither ``--debug``, ``-q`` nor ``LOG_LEVEL`` says otherwise.
    """
    if debug:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    else:
        name = os.environ.get("LOG_LEVEL", default_level).upper()
        level = logging.getLevelNamesMapping().get(name, logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str, **context: Any) -> Any:
    """A logger bound to ``component`` and any extra context (consumer, stream, …)."""
    return structlog.get_logger().bind(component=component, **context)


SHOWN_KEY_BYTES = 200  # bytes of a key shown; a key may be 512 MB long
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def show_key(key: bytes, db: int | None = None) -> str:
    """A key as people see it, in logs, errors and summaries: its text where it is UTF-8,
    ``\\xNN`` for other bytes and for control characters (so a key can never break a line or
    a terminal), cut after :data:`SHOWN_KEY_BYTES` bytes with ``…``, and ``db3:`` in front
    when ``db`` is given."""
    text = key[:SHOWN_KEY_BYTES].decode("utf-8", "backslashreplace").translate(_CONTROL)
    if len(key) > SHOWN_KEY_BYTES:
        text += "…"
    return text if db is None else f"db{db}:{text}"
