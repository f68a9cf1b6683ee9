"""The server's telemetry in one object: a finished request's record goes to the span, then
the log line (which names the span's trace), then the metrics.

Telemetry observes and never steers: a failure here is logged and the request goes on.
"""

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from enduro.observability.engine_collector import EngineCollector, EngineSource
from enduro.observability.logging import RequestLog
from enduro.observability.metrics import RequestMetrics, build_info, standard_collectors
from enduro.observability.request_record import RequestRecord
from enduro.observability.tracing import RequestTracer

log = logging.getLogger("enduro.observability")


class Telemetry:
    def __init__(
        self,
        registry: CollectorRegistry,
        tracer: RequestTracer,
        request_log: RequestLog,
    ) -> None:
        self.registry = registry
        self.metrics = RequestMetrics(registry)
        self.tracer = tracer
        self.request_log = request_log
        # Also told of every finished request (the guard's latency sampler).
        self.listeners: list[Callable[[RequestRecord], None]] = []

    @classmethod
    def create(
        cls,
        engine: EngineSource,
        build_labels: dict[str, str],
        *,
        log_prompts: bool = False,
        registry: CollectorRegistry | None = None,
        tracer_provider: Any | None = None,
    ) -> "Telemetry":
        """Metrics in `registry` (a new one by default), spans to `tracer_provider` (by
        default as the OTEL_* environment says)."""
        registry = registry if registry is not None else CollectorRegistry()
        standard_collectors(registry)
        build_info(registry, build_labels)
        registry.register(EngineCollector(engine))
        tracer = (
            RequestTracer.from_provider(tracer_provider)
            if tracer_provider is not None
            else RequestTracer.from_environment()
        )
        return cls(registry, tracer, RequestLog(log_prompts))

    def observe(self, record: RequestRecord) -> None:
        try:
            span = self.tracer.export(record)
            self.request_log.write(record, span)
            self.metrics.observe(record)
            for listener in self.listeners:
                listener(record)
        except Exception:
            log.exception("telemetry failed for request %s", record.request_id)

    def shutdown(self) -> None:
        self.tracer.shutdown()
