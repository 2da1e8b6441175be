"""structlog set-up: JSON lines on stdout (or a console renderer for people at a TTY)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from kms_agent.config import LoggingConfig

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Keys whose values are never rendered, whatever a caller binds: defence in depth.
_REDACTED_KEYS = frozenset(
    {"token", "value", "secret", "secret_value", "password", "authorization"}
)


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _REDACTED_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


#: Tracebacks as JSON, without local variables: structlog's default ``dict_tracebacks``
#: renders every frame's locals, and on a request path those hold tokens and values. (The
#: console format gets the plain traceback text, which has no locals either.)
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)

_stream: list[TextIO] = []


def configure(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """(Re)configure logging; safe to call again on reload (keeps the stream it had)."""
    if stream is not None:
        _stream[:] = [stream]
    out = _stream[0] if _stream else sys.stdout
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if cfg.format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info if cfg.format == "console" else _TRACEBACKS,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through stdlib logging: route warnings and up to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


def get(name: str) -> Any:
    """A named structlog logger."""
    return structlog.get_logger(name)
