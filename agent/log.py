"""structlog setup: a console renderer on a TTY, JSON lines otherwise (journald, files).

Log events are names with key/value pairs (``log.info("model_loaded", quant="Q4_K_M")``),
never f-strings, so they stay greppable and machine-readable.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for the whole process. ``json=None`` picks by TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose every line carries ``logger_name=<name>`` (pass ``__name__``).

    Bound as a key, because PrintLoggerFactory ignores the positional name that stdlib
    logger factories would use (``logger`` itself is a parameter of structlog.get_logger)."""
    return structlog.get_logger(logger_name=name)
