"""structlog setup: one call per process, context bound per service/worker/request."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _Stderr:
    """The process's stderr as it is when a line is written, not when logging was set up: a
    service run inside another program (a test, a benchmark) must not keep writing to a stream
    that program has since closed or replaced."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(service: str, level: str | None = None, fmt: str | None = None) -> structlog.stdlib.BoundLogger:
    level_name = (level or os.environ.get("CASCADE_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("CASCADE_LOG_FORMAT", "console")
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(service=service)
