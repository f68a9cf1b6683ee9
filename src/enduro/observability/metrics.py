"""Prometheus metrics, all in one injected CollectorRegistry (tests build a fresh one each).

Names start with `enduro_`, use base units (seconds, bytes, ratios), counters end in
`_total`, and no label is per request. Two kinds of source:
- RequestMetrics: counters and histograms observed once per finished request, from its
  record (observability/request_record.py); each counter is incremented only here.
- EngineCollector (engine_collector.py): gauges and engine-side counts read at scrape time
  from the latest engine heartbeat and the supervisor.
Plus the standard process_*, python_gc_* and python_info collectors, and enduro_build_info.
"""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from enduro.observability.request_record import ERROR_REASONS, RequestRecord

# Bucket bounds in seconds, for CPU inference: a decode step of a tiny model takes
# milliseconds, a long prompt's first token on a 2-core machine can take minutes.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip
REQUEST_DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)  # fmt: skip
REQUEST_QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0,
)  # fmt: skip


def standard_collectors(registry: CollectorRegistry) -> None:
    """process_* (this process: CPU, RSS, open fds), python_gc_* and python_info."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)


def build_info(registry: CollectorRegistry, labels: dict[str, str]) -> None:
    """enduro_build_info{version, model, dtype, ...} 1: what this server runs."""
    Info("enduro_build", "The server's version and configuration.", registry=registry).info(labels)


class RequestMetrics:
    """What finished requests add up to. `observe` is the only writer of these metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "enduro_requests_total",
            "HTTP requests answered, by route template (`other` for unknown paths) and status.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "enduro_request_errors_total",
            "Requests that failed, by reason (a stream cut short counts though it began 200).",
            ["reason"],
            registry=registry,
        )
        for reason in ERROR_REASONS:  # every series exists from the start, at 0
            self.errors.labels(reason)
        self.prompt_tokens = Counter(
            "enduro_prompt_tokens",
            "Prompt tokens of the requests handed to the engine (as in their usage).",
            registry=registry,
        )
        self.generation_tokens = Counter(
            "enduro_generation_tokens",
            "Tokens generated for clients (as in the requests' usage).",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "enduro_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "enduro_inter_token_latency_seconds",
            "Between successive tokens of one choice.",
            buckets=INTER_TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "enduro_request_duration_seconds",
            "From arrival to the end of the response, for requests handed to the engine.",
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self.request_queue = Histogram(
            "enduro_request_queue_seconds",
            "From admission until the engine first schedules the request.",
            buckets=REQUEST_QUEUE_BUCKETS,
            registry=registry,
        )

    def observe(self, record: RequestRecord) -> None:
        self.requests.labels(record.endpoint, str(record.status)).inc()
        if record.error_reason is not None:
            self.errors.labels(record.error_reason).inc()
        if not record.reached_engine:
            return
        self.prompt_tokens.inc(record.num_prompt_tokens)
        self.generation_tokens.inc(record.num_generation_tokens)
        self.request_duration.observe(record.duration or 0.0)
        if record.time_to_first_token is not None:
            self.time_to_first_token.observe(record.time_to_first_token)
        if record.queue_time is not None:
            self.request_queue.observe(record.queue_time)
        for latency in record.inter_token_latencies:
            self.inter_token_latency.observe(latency)
