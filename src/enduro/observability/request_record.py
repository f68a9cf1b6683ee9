"""One HTTP request's record: filled in while it runs, read once when it ends.

The telemetry middleware opens a record when a request arrives and puts it in the ASGI scope's
state; routes, generation and error responses note what they learn (the endpoint's sampling
parameters, token timings, usage, the error's reason); when the response is over the record
feeds the span, the log line and the metrics, so each figure is computed exactly once.

Times are time.monotonic() seconds, except `start_time_unix_ns` (for the span's wall clock).
"""

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

RECORD_KEY = "enduro.request_record"

# The GenAI semantic-convention operation of each generation endpoint.
GENAI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
}

# Probes, scrapes and the dashboard's polling: when they succeed they get no span, and their
# log line is DEBUG.
QUIET_ENDPOINTS = ("/health", "/ready", "/metrics", "/dashboard")

# Why a request failed, the `reason` label of enduro_request_errors_total.
ERROR_REASONS = (
    "validation",  # 400: bad input, the engine refused it
    "unauthorized",  # 401
    "not_found",  # 404 unknown model or route, 405
    "too_large",  # 413 body, 431 headers
    "aborted",  # the client went away (499, or a stream cut short), or the server aborted it
    "overloaded",  # 503: the queue is full
    "draining",  # 503: the server is shutting down
    "engine",  # 503: the engine died, is restarting or not ready yet
    "internal",  # 500, or a stream that failed midway
)


@dataclass
class RequestRecord:
    request_id: str
    method: str
    start_time: float = field(default_factory=time.monotonic)
    start_time_unix_ns: int = field(default_factory=time.time_ns)
    # The W3C trace context headers the client sent (traceparent, tracestate).
    trace_headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = "other"  # the route template, or "other"
    status: int = 0  # the HTTP status sent; 0 until the response starts
    error_reason: str | None = None  # one of ERROR_REASONS; the first noted wins
    response_complete: bool = False  # the last body byte went out
    duration: float | None = None  # arrival to the end of the response

    # Set by generation endpoints once the body is valid.
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    response_id: str | None = None
    stream: bool = False
    prompt_texts: list[str | None] = field(default_factory=list)  # None: sent as token ids

    # Set once the request is handed to the engine.
    reached_engine: bool = False
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    queue_time: float | None = None  # admission to the first engine schedule, first choice
    time_to_first_token: float | None = None  # arrival to the first token of any choice
    inter_token_latencies: list[float] = field(default_factory=list)  # every choice's gaps
    finish_reasons: dict[int, str] = field(default_factory=dict)  # by choice index
    _last_token_time: dict[int, float] = field(default_factory=dict)

    @property
    def operation(self) -> str | None:
        """gen_ai.operation.name, for generation endpoints."""
        return GENAI_OPERATIONS.get(self.endpoint)

    @property
    def is_quiet(self) -> bool:
        quiet = any(self.endpoint.startswith(prefix) for prefix in QUIET_ENDPOINTS)
        return quiet and self.error_reason is None and self.status < 400

    def describe_generation(
        self,
        *,
        model: str,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        response_id: str,
        stream: bool,
    ) -> None:
        self.model, self.max_tokens, self.response_id = model, max_tokens, response_id
        self.temperature, self.top_p, self.stream = temperature, top_p, stream

    def note_error(self, reason: str) -> None:
        if self.error_reason is None:
            self.error_reason = reason

    def note_scheduled(self, queue_time: float) -> None:
        if self.queue_time is None or queue_time < self.queue_time:
            self.queue_time = max(0.0, queue_time)

    def note_tokens(self, index: int, now: float) -> None:
        """An output with new tokens for choice `index` arrived at `now`."""
        if self.time_to_first_token is None:
            self.time_to_first_token = now - self.start_time
        previous = self._last_token_time.get(index)
        if previous is not None:
            self.inter_token_latencies.append(now - previous)
        self._last_token_time[index] = now

    def note_finish(self, index: int, reason: str) -> None:
        self.finish_reasons[index] = reason

    def note_usage(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        """The request's usage as reported to the client; it reached the engine."""
        self.reached_engine = True
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generation_tokens = num_generation_tokens

    def finish(self, endpoint: str, now: float) -> None:
        """The response is over (sent, failed, or the client left)."""
        self.endpoint = endpoint
        self.duration = now - self.start_time
        if not self.response_complete and self.status < 400:
            self.note_error("aborted")  # the stream was cut short

    @property
    def finish_reason_list(self) -> list[str]:
        return [self.finish_reasons[i] for i in sorted(self.finish_reasons)]


def record_of(scope: MutableMapping[str, Any]) -> RequestRecord:
    """The request's record; a detached one if no telemetry middleware opened it."""
    state = scope.setdefault("state", {})
    record = state.get(RECORD_KEY)
    if not isinstance(record, RequestRecord):
        record = state[RECORD_KEY] = RequestRecord(str(state.get("request_id", "")), "")
    return record
