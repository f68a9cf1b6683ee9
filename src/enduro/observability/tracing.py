"""One OpenTelemetry span per request, with the GenAI semantic conventions' attributes.

The span is built when the request is over, from its record, with the request's own start and
end times, as a child of the W3C `traceparent` the client sent (if any). OpenTelemetry is
imported lazily and everything degrades:
- no `opentelemetry-api`: no spans, no trace ids;
- the API but no exporter configured (OTEL_EXPORTER_OTLP_ENDPOINT or
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset), or the `tracing` extra (SDK + OTLP/HTTP
  exporter) missing: a no-op tracer, which still carries the client's trace id into the logs;
- otherwise spans are batched and exported over OTLP/HTTP.
Tests inject their own TracerProvider (an SDK one with an in-memory exporter).
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enduro import __version__
from enduro.observability.request_record import RequestRecord

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACE_HEADERS = ("traceparent", "tracestate")
# Errors that are the server's fault mark the span as failed; a client's are not (HTTP
# semantic conventions for server spans: only 5xx).
SERVER_FAULTS = frozenset({"internal", "engine", "overloaded", "draining"})

log = logging.getLogger("enduro.tracing")


@dataclass(frozen=True)
class SpanIds:
    trace_id: str  # 32 hex digits
    span_id: str | None  # 16 hex digits; None when no span was recorded (no-op tracer)


class RequestTracer:
    """Turns finished request records into server spans. `tracer` is an OpenTelemetry Tracer
    (None: tracing unavailable)."""

    def __init__(self, tracer: Any | None, provider: Any | None = None) -> None:
        self._tracer = tracer
        self._provider = provider  # shut down (flushed) with the server
        self._propagator: Any = None
        if tracer is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_provider(cls, provider: Any) -> "RequestTracer":
        return cls(provider.get_tracer("enduro", __version__), provider)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "RequestTracer":
        try:
            from opentelemetry import trace
        except ImportError:
            return cls(None)
        wanted = any(environ.get(name) for name in ENDPOINT_VARIABLES)
        if not wanted or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls(trace.NoOpTracer())
        provider = _otlp_provider(environ)
        return cls.from_provider(provider) if provider is not None else cls(trace.NoOpTracer())

    def export(self, record: RequestRecord) -> SpanIds | None:
        """Record the request's span; its ids (None without tracing or for quiet requests)."""
        if self._tracer is None or record.is_quiet:
            return None
        from opentelemetry.trace import SpanKind, Status, StatusCode

        span = self._tracer.start_span(
            span_name(record),
            context=self._propagator.extract(record.trace_headers),
            kind=SpanKind.SERVER,
            attributes=span_attributes(record),
            start_time=record.start_time_unix_ns,
        )
        if record.status >= 500 or record.error_reason in SERVER_FAULTS:
            span.set_status(Status(StatusCode.ERROR, record.error_reason))
        recorded = span.is_recording()
        span.end(end_time=record.start_time_unix_ns + round((record.duration or 0.0) * 1e9))
        context = span.get_span_context()
        if not context.is_valid:
            return None
        span_id = format(context.span_id, "016x") if recorded else None
        return SpanIds(format(context.trace_id, "032x"), span_id)

    def shutdown(self) -> None:
        """Flush spans still batched; a no-op without an SDK provider."""
        if self._provider is not None and hasattr(self._provider, "shutdown"):
            self._provider.shutdown()


def _otlp_provider(environ: Mapping[str, str]) -> Any | None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the tracing extra is not installed "
            "(pip install 'enduro[tracing]'); no spans are exported"
        )
        return None
    attributes = {"service.version": __version__}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "enduro"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def span_name(record: RequestRecord) -> str:
    """GenAI convention `{operation} {model}` for generation, `{method} {route}` otherwise."""
    if record.operation is not None:
        return f"{record.operation} {record.model}" if record.model else record.operation
    return f"{record.method} {record.endpoint}"


def span_attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": record.method,
        "http.route": record.endpoint,
        "http.response.status_code": record.status,
        "enduro.request.id": record.request_id,
    }
    if record.error_reason is not None:
        attributes["error.type"] = record.error_reason
    if record.operation is None:
        return attributes
    generation = {
        "gen_ai.operation.name": record.operation,
        "gen_ai.request.model": record.model,
        "gen_ai.request.max_tokens": record.max_tokens,
        "gen_ai.request.temperature": record.temperature,
        "gen_ai.request.top_p": record.top_p,
        "gen_ai.response.id": record.response_id,
    }
    attributes.update({k: v for k, v in generation.items() if v is not None})
    if record.reached_engine:
        attributes["gen_ai.usage.input_tokens"] = record.num_prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.num_generation_tokens
    if record.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = record.finish_reason_list
    return attributes
