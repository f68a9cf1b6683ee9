"""Logs: one line per finished request and per engine event, as JSON or as readable text.

`configure_logging` sets the root handler of a process (the API and the engine each call it),
so every logger, uvicorn's included, writes the same format to stderr. Structured fields go in
`extra=`: JSON lines carry them as keys, text lines append them as key=value.

Prompt text is personal data: it appears in request lines only with --log-prompts.
"""

import json
import logging
import sys
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from enduro.config import LOG_FORMATS
from enduro.observability.request_record import RequestRecord
from enduro.observability.tracing import SpanIds

REQUEST_LOGGER = "enduro.request"
# LogRecord attributes that are not structured fields; uvicorn adds color_message.
_NOT_FIELDS = frozenset([*RESERVED_ATTRS, "taskName", "color_message"])


class KeyValueFormatter(logging.Formatter):
    """`time level role pid logger: message key=value ...` (values JSON-encoded)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in _NOT_FIELDS}
        if not fields:
            return line
        pairs = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        head, newline, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{newline}{tail}"


def make_formatter(log_format: str, role: str) -> logging.Formatter:
    """The formatter of one process; `role` ("api", "engine") says which one wrote a line."""
    if log_format == "json":
        return JsonFormatter(
            ["levelname", "name", "process", "message"],
            rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
            static_fields={"role": role},
            reserved_attrs=list(_NOT_FIELDS),
            timestamp="time",
        )
    if log_format == "text":
        layout = f"%(asctime)s %(levelname)s {role} %(process)d %(name)s: %(message)s"
        return KeyValueFormatter(layout)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")


def configure_logging(log_format: str, role: str, level: int = logging.INFO) -> None:
    """One stderr handler on the root logger, replacing any there."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format, role))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _seconds(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


class RequestLog:
    """Writes the line of each finished request; probes and scrapes that succeed go at DEBUG."""

    def __init__(self, log_prompts: bool, logger: logging.Logger | None = None) -> None:
        self.log_prompts = log_prompts
        self.logger = logger or logging.getLogger(REQUEST_LOGGER)

    def write(self, record: RequestRecord, span: SpanIds | None) -> None:
        level = logging.DEBUG if record.is_quiet else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        duration = record.duration or 0.0
        message = f"{record.method} {record.endpoint} {record.status} {duration:.3f} s"
        self.logger.log(level, message, extra=self.fields(record, span))

    def fields(self, record: RequestRecord, span: SpanIds | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": "request",
            "request_id": record.request_id,
            "trace_id": span.trace_id if span else None,
            "span_id": span.span_id if span else None,
            "method": record.method,
            "endpoint": record.endpoint,
            "status": record.status,
            "error": record.error_reason,
            "model": record.model,
            "stream": record.stream,
            "prompt_tokens": record.num_prompt_tokens,
            "generation_tokens": record.num_generation_tokens,
            "queue_seconds": _seconds(record.queue_time),
            "ttft_seconds": _seconds(record.time_to_first_token),
            "duration_seconds": _seconds(record.duration),
            "finish_reasons": record.finish_reason_list,
        }
        if self.log_prompts:
            fields["prompts"] = record.prompt_texts
        return fields
