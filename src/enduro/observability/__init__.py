"""Observability: what the server and engine did, as Prometheus metrics, JSON or text logs and
OpenTelemetry spans. It observes and never steers.

- request_record.py: one HTTP request's figures, filled in as it runs (RequestRecord);
- telemetry.py: a finished record → its span (tracing.py), its log line (logging.py) and its
  metrics (metrics.py), in that order, so the log line can name the trace;
- engine_collector.py: scrape-time gauges and counters from the engine's latest heartbeat;
- process_memory.py: RssAnon + VmSwap per process, and the Python heap;
- timeseries.py, dashboard/: the live /dashboard page, which samples the same registry.

Kept free of imports so that importing one module does not pull in the others.
"""
