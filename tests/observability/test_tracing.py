"""One server span per request with the GenAI attributes, child of the client's traceparent;
its trace id in the request's log line; and tracing that degrades to nothing without an SDK."""

import io
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from enduro.observability.logging import REQUEST_LOGGER, make_formatter
from enduro.observability.request_record import RequestRecord
from enduro.observability.tracing import RequestTracer, SpanIds
from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    engine = tiny_engine(tiny_model_dir("llama"))
    yield engine
    engine.close()


class Traced:
    def __init__(self, url: str, exporter: InMemorySpanExporter, log: io.StringIO) -> None:
        self.url, self.exporter, self.log = url, exporter, log

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@pytest.fixture
def traced(engine: InProcessEngineClient) -> Iterator[Traced]:
    """The app with an SDK tracer exporting to memory, its request log as JSON in a buffer."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    log, handler = io.StringIO(), logging.StreamHandler()
    handler.setStream(log)
    handler.setFormatter(make_formatter("json", "api"))
    logger = logging.getLogger(REQUEST_LOGGER)
    logger.addHandler(handler)
    previous_level, logger.level = logger.level, logging.INFO
    try:
        with serve(tiny_app(engine, tracer_provider=provider)) as url:
            yield Traced(url, exporter, log)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        provider.shutdown()


def test_a_completion_is_one_server_span_under_the_clients_trace(traced: Traced) -> None:
    body = {"prompt": "Hello world", "max_tokens": 5, "top_p": 0.9, **GREEDY}
    headers = {"traceparent": TRACEPARENT, "X-Request-Id": "trace-1"}
    response = httpx.post(f"{traced.url}/v1/completions", json=body, headers=headers, timeout=60)
    usage = response.json()["usage"]
    (span,) = traced.spans()
    assert span.name == "text_completion tiny"
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.status.status_code is StatusCode.UNSET
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time < span.end_time
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/completions",
        "http.response.status_code": 200,
        "enduro.request.id": "trace-1",
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.response.id": "cmpl-trace-1",
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.finish_reasons": ("length",),
    }
    # The request's log line names the same request and trace.
    (line,) = traced.log_lines()
    assert line["request_id"] == response.headers["x-request-id"] == "trace-1"
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == format(span.context.span_id, "016x")
    assert line["prompt_tokens"] == usage["prompt_tokens"] and line["generation_tokens"] == 5


def test_a_streamed_chat_without_traceparent_starts_a_trace(traced: Traced) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        **GREEDY,
    }
    with httpx.stream("POST", f"{traced.url}/v1/chat/completions", json=body, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        list(r.iter_lines())
    (span,) = traced.spans()
    assert span.parent is None
    assert span.name == "chat tiny"
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.max_tokens"] == 3
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.request.top_p"] == 1.0
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["gen_ai.response.finish_reasons"] == ("length", "length")
    assert attributes["gen_ai.response.id"] == f"chatcmpl-{request_id}"
    (line,) = traced.log_lines()
    assert line["request_id"] == request_id
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["stream"] is True and line["finish_reasons"] == ["length", "length"]


def test_a_rejected_request_is_a_span_with_its_error_type(traced: Traced) -> None:
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 3}
    headers = {"traceparent": TRACEPARENT}
    assert httpx.post(f"{traced.url}/v1/completions", json=body, headers=headers).status_code == 400
    (span,) = traced.spans()
    assert span.name == "text_completion"  # the body never parsed: no model
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/completions",
        "http.response.status_code": 400,
        "enduro.request.id": traced.log_lines()[0]["request_id"],
        "error.type": "validation",
        "gen_ai.operation.name": "text_completion",
    }
    assert span.status.status_code is StatusCode.UNSET  # a client's error, not the server's


def test_probes_and_scrapes_make_no_spans(traced: Traced) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{traced.url}{path}").status_code == 200
    assert httpx.get(f"{traced.url}/v1/models").status_code == 200
    assert [span.name for span in traced.spans()] == ["GET /v1/models"]


def _record(**changes: Any) -> RequestRecord:
    record = RequestRecord("r-1", "POST", trace_headers={"traceparent": TRACEPARENT})
    record.endpoint, record.status, record.duration = "/v1/completions", 200, 0.5
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_without_an_exporter_the_clients_trace_id_still_reaches_the_logs() -> None:
    tracer = RequestTracer.from_environment({})
    assert tracer.export(_record()) == SpanIds(TRACE_ID, None)
    assert tracer.export(_record(trace_headers={})) is None


def test_without_opentelemetry_there_is_no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    tracer = RequestTracer.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert tracer.export(_record()) is None


def test_an_endpoint_without_the_tracing_extra_warns_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with caplog.at_level(logging.WARNING, logger="enduro.tracing"):
        tracer = RequestTracer.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert "enduro[tracing]" in caplog.text
    assert tracer.export(_record()) == SpanIds(TRACE_ID, None)


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_spans_go_out_over_otlp_http_when_an_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    try:
        tracer = RequestTracer.from_environment()
        ids = tracer.export(_record(model="tiny"))
        tracer.shutdown()  # flushes the batch
    finally:
        collector.shutdown()
    assert ids is not None and ids.trace_id == TRACE_ID and ids.span_id is not None
    ((path, body),) = _Collector.received
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "enduro"
    (span,) = resource_spans.scope_spans[0].spans
    assert span.name == "text_completion tiny"
    assert span.trace_id.hex() == TRACE_ID and span.span_id.hex() == ids.span_id
    assert span.parent_span_id.hex() == PARENT_ID
    assert span.end_time_unix_nano - span.start_time_unix_nano == 500_000_000
