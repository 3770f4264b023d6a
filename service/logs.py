"""structlog set-up: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from service.tracing import current_ids

REDACTED = "[redacted]"
# Secrets that may ride in a message (an access-log line with ?token=, an echoed header),
# by their shape: callback tokens, bearer credentials, our API keys, webhook secrets.
PATTERNS = [
    (re.compile(r"(token=)[^&\s\"']+"), r"\1" + REDACTED),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"\bdg_[A-Za-z0-9_-]{8,}"), "dg_" + REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{8,}"), "whsec_" + REDACTED),
    (
        re.compile(r"(x-(?:signature|api-key)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+", re.IGNORECASE),
        r"\1" + REDACTED,
    ),
]


def redactor(literals: Iterable[str] = ()) -> structlog.types.Processor:
    """A processor that scrubs secrets (by shape, and the given literal values) from events."""
    exact = [v for v in literals if v and len(v) >= 6]

    def scrub(text: str) -> str:
        for value in exact:
            text = text.replace(value, REDACTED)
        for pattern, repl in PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return scrub(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clean(v) for v in value)
        return value

    def processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = clean(value)
        return event

    return processor


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The current span's trace_id and span_id (OpenTelemetry), when one is recorded."""
    event.update(current_ids())
    return event


def configure_logging(
    level: str = "INFO", *, json: bool | None = None, secrets: Iterable[str] = ()
) -> None:
    """Route stdlib and structlog output through one renderer that never shows a secret."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    # JSON lines carry the traceback as text; the console renderer formats its own.
    tail: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if use_json else []
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                redactor(secrets),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # psycopg_pool logs every checkout at info ("connection given by …"): a line per submit.
    logging.getLogger("psycopg.pool").setLevel(max(root.level, logging.WARNING))
