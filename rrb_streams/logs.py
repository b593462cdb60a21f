"""Logging: structlog key/value events with stable names.

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
