"""DashboardSampler: the last hour of the server's metrics, one point per interval, for /dashboard.

Each `sample(now)` reads the Prometheus registry once and turns what changed since the
previous read into a DashboardPoint: rates from counter deltas, latency percentiles from
histogram bucket deltas (as PromQL's `histogram_quantile(q, increase(..._bucket[interval]))`
does), memory and KV usage from the gauges' current values. Every series is summed over its
label sets. The sampler only reads the registry: it does not care whether the values come from
the API process, the engine's stats or a test.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

TTFT = "enduro_time_to_first_token_seconds"
E2E = "enduro_request_duration_seconds"
GENERATION_TOKENS = "enduro_generation_tokens_total"
REQUESTS = "enduro_requests_total"
MEMORY = "enduro_process_memory_bytes"
KV_USAGE = "enduro_kv_cache_usage_ratio"
HISTOGRAMS = (TTFT, E2E)
# Requests/s counts generation only: the dashboard's own polls and metric scrapes are noise.
GENERATION_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})
SUMMED = frozenset({GENERATION_TOKENS, REQUESTS, MEMORY, KV_USAGE})

DEFAULT_INTERVAL = 5.0
WINDOW_SECONDS = 3600.0

log = logging.getLogger("enduro.observability")


class Registry(Protocol):
    """What the sampler needs of a prometheus_client CollectorRegistry."""

    def collect(self) -> Iterable[Metric]: ...


@dataclass(frozen=True)
class Reading:
    """The registry's samples the dashboard uses, each summed over its label sets."""

    values: Mapping[str, float]  # sample name → value (counters and gauges)
    buckets: Mapping[str, Mapping[float, float]]  # histogram name → {le: cumulative count}


@dataclass(frozen=True)
class DashboardPoint:
    t: float  # unix seconds at the end of the interval
    ttft_p50: float | None  # seconds; None when no first token was observed in the interval
    ttft_p99: float | None
    e2e_p50: float | None  # seconds; None when no request finished in the interval
    e2e_p99: float | None
    tokens_per_second: float  # generated tokens
    requests_per_second: float  # finished generation requests, any status
    memory_bytes: float | None  # API + engine process; None until either reports
    kv_usage: float | None  # share of KV blocks in use, 0..1


def read_registry(registry: Registry) -> Reading:
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS}
    for metric in registry.collect():
        for sample in metric.samples:
            name = sample.name.removesuffix("_bucket")
            if name in buckets and sample.name.endswith("_bucket"):
                upper_bound = float(sample.labels["le"])
                counts = buckets[name]
                counts[upper_bound] = counts.get(upper_bound, 0.0) + sample.value
            elif sample.name in SUMMED and _counts(sample.name, sample.labels):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Reading(values, buckets)


def _counts(name: str, labels: Mapping[str, str]) -> bool:
    return name != REQUESTS or labels.get("endpoint") in GENERATION_ENDPOINTS


def counter_increase(before: float, after: float) -> float:
    # A counter only goes down when it restarts from zero (PromQL's rate assumes the same).
    return after - before if after >= before else after


def bucket_increase(
    before: Mapping[float, float], after: Mapping[float, float]
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) observed between two readings, by upper bound."""
    increase = [(le, count - before.get(le, 0.0)) for le, count in sorted(after.items())]
    if any(count < 0 for _, count in increase):
        return sorted(after.items())  # the histogram restarted from zero
    return increase


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative `buckets`, interpolated linearly inside the bucket that
    holds it, like PromQL's histogram_quantile; None when the buckets are empty.

    The lowest bucket starts at 0; a quantile in the +Inf bucket is the highest finite bound.
    """
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound if len(buckets) > 1 else None
            if upper_bound <= 0:
                return upper_bound
            # count > lower_count here: the previous bucket's count was below rank.
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (upper_bound - lower_bound) * share
        lower_bound, lower_count = upper_bound, count
    return None


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def build_point(now: float, seconds: float, before: Reading, after: Reading) -> DashboardPoint:
    def rate(name: str) -> float:
        increase = counter_increase(before.values.get(name, 0.0), after.values.get(name, 0.0))
        return increase / seconds

    def quantile(q: float, histogram: str) -> float | None:
        increase = bucket_increase(before.buckets[histogram], after.buckets[histogram])
        return histogram_quantile(q, increase)

    return DashboardPoint(
        t=now,
        ttft_p50=quantile(0.5, TTFT),
        ttft_p99=quantile(0.99, TTFT),
        e2e_p50=quantile(0.5, E2E),
        e2e_p99=quantile(0.99, E2E),
        tokens_per_second=rate(GENERATION_TOKENS),
        requests_per_second=rate(REQUESTS),
        memory_bytes=finite_or_none(after.values.get(MEMORY)),
        kv_usage=finite_or_none(after.values.get(KV_USAGE)),
    )


class DashboardSampler:
    """A ring buffer of the last `capacity` DashboardPoints (one hour by default), filled by
    `sample(now)`; `start()` calls it every `interval` seconds on the running event loop."""

    def __init__(
        self, registry: Registry, interval: float = DEFAULT_INTERVAL, capacity: int | None = None
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        if capacity is None:
            capacity = math.ceil(WINDOW_SECONDS / interval)
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.registry = registry
        self.interval = interval
        self.points: deque[DashboardPoint] = deque(maxlen=capacity)
        self._previous: tuple[float, Reading] | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float) -> DashboardPoint | None:
        """Read the registry at unix time `now`; the point for the interval since the previous
        read, or None for the first read (and if the clock went backwards)."""
        reading = read_registry(self.registry)
        previous, self._previous = self._previous, (now, reading)
        if previous is None or now <= previous[0]:
            return None
        then, before = previous
        point = build_point(now, now - then, before, reading)
        self.points.append(point)
        return point

    def to_json(self) -> dict[str, Any]:
        # dict(vars(p)), not asdict(p): asdict deep-copies, ~30x slower for an hour of points.
        points = [dict(vars(point)) for point in self.points]
        return {"interval_seconds": self.interval, "points": points}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_time = loop.time()
        while True:
            try:
                self.sample(time.time())
            except Exception:
                # A failing collector costs a point, not the rest of the series.
                log.exception("dashboard: reading the metrics registry failed")
            # Fixed cadence; after a stall, sample at once rather than catch up in a burst.
            next_time = max(next_time + self.interval, loop.time())
            await asyncio.sleep(next_time - loop.time())
