"""DashboardSampler over a fresh registry filled here: rates and percentiles from exact deltas,
the ring buffer's bound, nulls when idle, counter resets, and the sampling task."""

import asyncio
import math
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from enduro.observability.timeseries import DashboardPoint, DashboardSampler, histogram_quantile

BUCKETS = (0.125, 0.25, 0.5, 1.0)  # binary fractions: interpolations come out exact


class Metrics:
    """The server's metric names, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("enduro_time_to_first_token_seconds", "", buckets=BUCKETS, registry=r)
        self.e2e = Histogram("enduro_request_duration_seconds", "", buckets=BUCKETS, registry=r)
        self.tokens = Counter("enduro_generation_tokens", "", registry=r)
        self.requests = Counter("enduro_requests", "", ["endpoint", "status"], registry=r)
        self.memory = Gauge("enduro_process_memory_bytes", "", ["process"], registry=r)
        self.kv_usage = Gauge("enduro_kv_cache_usage_ratio", "", registry=r)


def idle_point(t: float, memory: float | None, kv: float | None) -> DashboardPoint:
    return DashboardPoint(t, None, None, None, None, 0.0, 0.0, memory, kv)


def test_a_point_holds_rates_and_percentiles_of_what_changed_in_the_interval() -> None:
    metrics = Metrics()
    # Before the first reading: not part of any interval.
    for _ in range(100):
        metrics.ttft.observe(0.9)
        metrics.e2e.observe(0.05)
    metrics.tokens.inc(1000)
    sampler = DashboardSampler(metrics.registry, interval=5.0)
    assert sampler.sample(100.0) is None

    for value in [0.1] * 50 + [0.2] * 48 + [0.3] * 2:
        metrics.ttft.observe(value)  # cumulative 0.125:50, 0.25:98, 0.5:100, 1:100, +Inf:100
    for value in (0.3, 0.6, 0.7, 1.5):
        metrics.e2e.observe(value)  # cumulative 0.25:0, 0.5:1, 1:3, +Inf:4
    metrics.tokens.inc(50)
    metrics.requests.labels("/v1/completions", "200").inc(3)
    metrics.requests.labels("/v1/chat/completions", "200").inc()
    metrics.requests.labels("/v1/completions", "400").inc()
    metrics.requests.labels("/dashboard/data", "200").inc(7)  # not generation: not counted
    metrics.memory.labels("api").set(1000)
    metrics.memory.labels("engine").set(3000)
    metrics.kv_usage.set(0.25)
    point = sampler.sample(110.0)

    assert point == DashboardPoint(
        t=110.0,
        ttft_p50=0.125,  # rank 50 is the top of the first bucket
        ttft_p99=0.375,  # rank 99: halfway through (0.25, 0.5], which holds ranks 98-100
        e2e_p50=0.75,  # rank 2: halfway through (0.5, 1], which holds ranks 1-3
        e2e_p99=1.0,  # rank 3.96 is in +Inf: the highest finite bound
        tokens_per_second=5.0,
        requests_per_second=0.5,
        memory_bytes=4000.0,
        kv_usage=0.25,
    )
    assert list(sampler.points) == [point]


def test_an_idle_interval_has_no_percentiles_and_zero_rates() -> None:
    metrics = Metrics()
    metrics.ttft.observe(0.3)
    metrics.tokens.inc(7)
    metrics.memory.labels("api").set(2048)
    sampler = DashboardSampler(metrics.registry, interval=5.0)
    sampler.sample(0.0)
    assert sampler.sample(5.0) == idle_point(5.0, memory=2048.0, kv=0.0)


def test_the_ring_buffer_keeps_the_newest_capacity_points() -> None:
    metrics = Metrics()
    sampler = DashboardSampler(metrics.registry, interval=0.2, capacity=3)
    for step in range(10):
        metrics.tokens.inc(step)
        sampler.sample(step * 0.5)
    assert [p.t for p in sampler.points] == [3.5, 4.0, 4.5]
    assert [p.tokens_per_second for p in sampler.points] == [14.0, 16.0, 18.0]


def test_capacity_defaults_to_one_hour_of_intervals() -> None:
    registry = CollectorRegistry()
    assert DashboardSampler(registry, interval=5.0).points.maxlen == 720
    assert DashboardSampler(registry, interval=0.2).points.maxlen == 18000
    with pytest.raises(ValueError, match="interval"):
        DashboardSampler(registry, interval=0.0)
    with pytest.raises(ValueError, match="capacity"):
        DashboardSampler(registry, interval=1.0, capacity=0)


class FakeRegistry:
    """Whatever `metrics` holds at the time of the read, as a custom collector would."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.metrics)


def tokens_total(value: float) -> Metric:
    return CounterMetricFamily("enduro_generation_tokens", "", value=value)


def test_a_counter_that_went_down_restarted_from_zero() -> None:
    registry = FakeRegistry()
    sampler = DashboardSampler(registry, interval=1.0)
    registry.metrics = [tokens_total(500)]
    sampler.sample(10.0)
    registry.metrics = [tokens_total(40)]
    point = sampler.sample(12.0)
    assert point is not None and point.tokens_per_second == 20.0


def test_missing_metrics_read_as_zero_rates_and_nulls() -> None:
    sampler = DashboardSampler(FakeRegistry(), interval=1.0)
    sampler.sample(1.0)
    assert sampler.sample(2.0) == idle_point(2.0, memory=None, kv=None)


def test_a_clock_that_went_backwards_gives_no_point() -> None:
    sampler = DashboardSampler(FakeRegistry(), interval=1.0)
    sampler.sample(10.0)
    assert sampler.sample(9.0) is None
    assert sampler.sample(10.0) == idle_point(10.0, memory=None, kv=None)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [], None),
        (0.5, [(1.0, 0.0), (math.inf, 0.0)], None),
        (0.5, [(1.0, 4.0), (2.0, 8.0), (math.inf, 8.0)], 1.0),
        (0.75, [(1.0, 4.0), (2.0, 8.0), (math.inf, 8.0)], 1.5),
        (0.5, [(1.0, 0.0), (2.0, 0.0), (math.inf, 3.0)], 2.0),
        (0.5, [(math.inf, 3.0)], None),
    ],
)
def test_histogram_quantile(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    assert histogram_quantile(q, buckets) == expected


def test_to_json_is_the_data_endpoints_body() -> None:
    metrics = Metrics()
    metrics.kv_usage.set(0.5)
    sampler = DashboardSampler(metrics.registry, interval=0.2)
    sampler.sample(1.0)
    sampler.sample(1.25)
    assert sampler.to_json() == {
        "interval_seconds": 0.2,
        "points": [
            {
                "t": 1.25,
                "ttft_p50": None,
                "ttft_p99": None,
                "e2e_p50": None,
                "e2e_p99": None,
                "tokens_per_second": 0.0,
                "requests_per_second": 0.0,
                "memory_bytes": None,
                "kv_usage": 0.5,
            }
        ],
    }


class FlakyRegistry(FakeRegistry):
    """Fails its first read."""

    def __init__(self) -> None:
        super().__init__()
        self.num_reads = 0

    def collect(self) -> Iterable[Metric]:
        self.num_reads += 1
        if self.num_reads == 1:
            raise RuntimeError("collector broke")
        return super().collect()


def test_the_task_samples_every_interval_until_stopped() -> None:
    registry = FlakyRegistry()
    sampler = DashboardSampler(registry, interval=0.01)

    async def run() -> None:
        sampler.start()
        while len(sampler.points) < 3:
            await asyncio.sleep(0.01)
        await sampler.stop()

    asyncio.run(asyncio.wait_for(run(), timeout=10))
    num_reads = registry.num_reads
    assert num_reads >= 5  # one failed read, one baseline, three points
    asyncio.run(asyncio.sleep(0.05))
    assert registry.num_reads == num_reads
