import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from enduro.config import GuardConfig
from enduro.guard.detectors import (
    CPU_CONTENTION,
    Detector,
    DriftDetector,
    Finding,
    InvariantDetector,
    LeakDetector,
    forecast_seconds,
)
from enduro.guard.sample import Sample
from enduro.guard.stats import SlopeEstimate

MiB = 1 << 20
# 2 s samples, 30 s warm-up, 300 s window, 64 MiB/hour, p < 0.001; drift over 30 s by k = 4
# and 25 %: tighter than the defaults, the figures these cases were worked out for.
CONFIG = GuardConfig(guard_warmup=30.0, drift_recent=30.0, drift_min_increase=0.25)


def memory_samples(
    memory: Callable[[float], float],
    seconds: float,
    seed: int = 0,
    pid: Callable[[float], int] = lambda t: 1,
    noise: float = 2 * MiB,
) -> list[Sample]:
    """A sample every 2 s, 3 requests per second, each process ±noise of uniform noise."""
    rng = np.random.default_rng(seed)
    return [
        Sample(
            time=t,
            engine_pid=pid(t),
            engine_memory_bytes=int(memory(t) + rng.uniform(-noise, noise)),
            api_memory_bytes=int(memory(t) + rng.uniform(-noise, noise)),
            num_requests=int(3 * t),
        )
        for t in np.arange(0.0, seconds + 1, 2.0)
    ]


def flagged_times(detector: Detector, samples: Sequence[Sample]) -> list[float]:
    """Times at which the detector, fed the samples so far, reports a problem."""
    return [s.time for k, s in enumerate(samples) if detector.observe(samples[: k + 1], s.time)]


def per_request_leak(t: float) -> float:
    return 500 * MiB + 262144 * 3 * t  # 256 KiB per request, 3 requests per second


def test_a_per_request_leak_is_flagged_within_60_s_after_the_warmup() -> None:
    samples = memory_samples(per_request_leak, 120)
    detector = LeakDetector(CONFIG, "engine")
    # Warm-up ends at 30 s; each half of the points must itself be significant, which
    # takes 18 points here.
    assert flagged_times(detector, samples)[0] == 64.0
    (finding,) = detector.observe(samples[:33], now=64.0)
    assert (finding.detector, finding.process, finding.severity) == (
        "memory_leak",
        "engine",
        "warning",
    )
    assert finding.details["num_points"] == 18
    per_request = finding.details["bytes_per_request"]
    assert isinstance(per_request, float)
    assert abs(per_request - 262144) < 0.1 * 262144
    assert finding.message.startswith("engine memory grows 2563.7 MiB/hour (95% interval")


def test_a_flat_noisy_series_is_never_flagged() -> None:
    samples = memory_samples(lambda t: 500 * MiB, 700, seed=1)
    assert flagged_times(LeakDetector(CONFIG, "engine"), samples) == []


def test_a_one_off_step_is_not_a_leak() -> None:
    samples = memory_samples(lambda t: 500 * MiB + (50 * MiB if t >= 100 else 0), 600, seed=2)
    detector = LeakDetector(CONFIG, "engine")
    assert flagged_times(detector, samples) == []
    # The whole-window fit alone would call it a leak for 105 samples (126 s to 334 s), while
    # the step sits inside the window with enough points on both sides; the check that both
    # halves of the points rise on their own is what rejects it.
    looks_like_leak = []
    for k, sample in enumerate(samples):
        fit = detector.estimate(samples[: k + 1], sample.time)
        if fit and fit.p_value < 0.001 and fit.slope * 3600 > CONFIG.leak_threshold:
            looks_like_leak.append(sample.time)
    assert (looks_like_leak[0], looks_like_leak[-1], len(looks_like_leak)) == (126.0, 334.0, 105)


def test_a_small_settling_creep_on_a_smooth_series_is_not_a_leak() -> None:
    # 10 MiB over the five minutes after the warm-up, then flat, ±0.5 MiB of noise: the shape
    # of the default model's live memory while an agent soak settles (benchmarks/README.md,
    # agent-paired). It is significant in both halves and faster than 64 MiB/h...
    def memory(t: float) -> float:
        return 500 * MiB + 10 * MiB * min(max(t - 30, 0), 300) / 300

    samples = memory_samples(memory, 600, seed=6, noise=MiB / 2)
    rate_only = LeakDetector(dataclasses.replace(CONFIG, leak_min_growth=0), "engine")
    times = flagged_times(rate_only, samples)
    assert (times[0], times[-1], len(times)) == (100.0, 466.0, 180)
    # ...but it adds less than the 16 MiB a leak must add over the fitted span.
    assert flagged_times(LeakDetector(CONFIG, "engine"), samples) == []


def test_a_new_engine_pid_starts_a_new_fit() -> None:
    def memory(t: float) -> float:
        return per_request_leak(t if t < 200 else t - 200)  # recycled at 200 s

    samples = memory_samples(memory, 400, seed=3, pid=lambda t: 1 if t < 200 else 2)
    engine = LeakDetector(CONFIG, "engine")
    times = flagged_times(engine, samples)
    assert (times[0], max(t for t in times if t < 200)) == (64.0, 198.0)
    # The new pid is warm after 230 s and has its 10 points at 248 s.
    fitted = [s.time for k, s in enumerate(samples) if engine.estimate(samples[: k + 1], s.time)]
    assert min(t for t in fitted if t >= 200) == 248.0
    assert min(t for t in times if t >= 200) == 268.0
    # The API process is not restarted by a new engine pid.
    assert LeakDetector(CONFIG, "api").estimate(samples[:102], now=202.0) is not None


def test_the_api_warmup_counts_from_the_first_sample() -> None:
    samples = memory_samples(per_request_leak, 120, seed=4)
    api = LeakDetector(CONFIG, "api")
    assert api.estimate(samples[:24], now=46.0) is None  # 9 points after 30 s
    fit = api.estimate(samples[:25], now=48.0)
    assert fit is not None and fit.num_points == 10


def test_free_pages_the_allocator_keeps_are_not_a_leak() -> None:
    # The engine's RSS climbs by 200 MiB over ten minutes as its allocator keeps the pages of
    # ever larger steps for reuse (held), while what its callers hold stays flat.
    def held(t: float) -> float:
        return 200 * MiB * t / 600

    samples = [
        dataclasses.replace(s, engine_malloc_held_bytes=int(held(s.time)))
        for s in memory_samples(lambda t: 800 * MiB + held(t), 600, seed=5)
    ]
    assert flagged_times(LeakDetector(CONFIG, "engine"), samples) == []
    # The same RSS without the allocator's figures is a leak.
    unknown = [dataclasses.replace(s, engine_malloc_held_bytes=None) for s in samples]
    assert flagged_times(LeakDetector(CONFIG, "engine"), unknown) != []


def test_the_heartbeats_own_live_memory_is_fitted_when_there() -> None:
    # An RSS read apart from the allocator's figures can disagree with them (a purge between
    # the readings); the heartbeat's own reading, taken with them, is what counts: a rise in
    # the RSS alone is not flagged...
    flat_live = [
        dataclasses.replace(s, engine_live_memory_bytes=int(800 * MiB))
        for s in memory_samples(per_request_leak, 120)
    ]
    assert flagged_times(LeakDetector(CONFIG, "engine"), flat_live) == []
    # ...and a leak in the heartbeat's reading is, as in the RSS test above (same noise).
    leaking = [
        dataclasses.replace(
            s, engine_live_memory_bytes=s.engine_memory_bytes, engine_memory_bytes=800 * MiB
        )
        for s in memory_samples(per_request_leak, 120)
    ]
    assert flagged_times(LeakDetector(CONFIG, "engine"), leaking)[0] == 64.0


def test_leak_detector_refuses_unknown_process() -> None:
    with pytest.raises(ValueError):
        LeakDetector(CONFIG, "tokenizer")


def tpot_samples(level: Callable[[float], float], seconds: float, seed: int) -> list[Sample]:
    """TPOT every 2 s with 5 % gaussian noise."""
    rng = np.random.default_rng(seed)
    return [
        Sample(time=t, tpot_p50=level(t) * (1 + rng.normal(0, 0.05)))
        for t in np.arange(0.0, seconds + 1, 2.0)
    ]


def test_a_doubled_tpot_is_drift_until_the_baseline_absorbs_it() -> None:
    samples = tpot_samples(lambda t: 0.02 if t < 700 else 0.04, 1400, seed=0)
    detector = DriftDetector(CONFIG, "tpot_p50")
    # The trailing baseline takes the new level in: its spread passes the jump ~60 s later.
    assert flagged_times(detector, samples) == [float(t) for t in range(708, 763, 2)]
    (finding,) = detector.observe(samples[:355], now=708.0)
    assert (finding.detector, finding.process, finding.details["series"]) == (
        "latency_drift",
        None,
        "tpot_p50",
    )
    assert finding.message == (
        "tpot_p50 averaged 26.3 ms over the last 30 s, above its 25.0 ms threshold "
        "(baseline 20.0 ± 1.0 ms)."
    )


def with_cpu_wait(
    samples: list[Sample], rate: Callable[[float], float], pid: Callable[[float], int]
) -> list[Sample]:
    """The samples with the engine's cumulative run-queue wait growing at rate(t) s per s."""
    waited, result, last = 0.0, [], 0.0
    for sample in samples:
        waited += rate(sample.time) * (sample.time - last)
        last = sample.time
        result.append(
            dataclasses.replace(sample, engine_pid=pid(sample.time), engine_cpu_wait_seconds=waited)
        )
    return result


def test_a_drift_while_the_engine_waits_for_cpus_is_contention() -> None:
    slower = tpot_samples(lambda t: 0.02 if t < 700 else 0.04, 800, seed=0)
    starved = with_cpu_wait(slower, lambda t: 0.03 if t < 700 else 0.9, lambda t: 7)
    detector = DriftDetector(CONFIG, "tpot_p50")
    (finding,) = detector.observe(starved[:355], now=708.0)
    assert finding.details["cause"] == CPU_CONTENTION
    assert finding.details["baseline_cpu_wait_rate"] == pytest.approx(0.03)
    # The recent 30 s (678 to 708) hold 10 s of the new rate (the 2 s before each sample
    # from 700 on) after 20 s of the old.
    assert finding.details["cpu_wait_rate"] == pytest.approx((20 * 0.03 + 10 * 0.9) / 30)
    assert finding.message.endswith(
        "the engine's threads waited 0.32 s per second for a CPU (baseline 0.03): contention "
        "from outside the server."
    )
    # The same slowdown with the engine getting its CPUs: its own problem, no cause given.
    busy = with_cpu_wait(slower, lambda t: 0.03, lambda t: 7)
    (own,) = detector.observe(busy[:355], now=708.0)
    assert "cause" not in own.details and own.details["cpu_wait_rate"] == pytest.approx(0.03)
    # A new worker's count starts again: no rate across the change, no cause.
    recycled = with_cpu_wait(slower, lambda t: 0.9, lambda t: 7 if t < 690 else 8)
    (across,) = detector.observe(recycled[:355], now=708.0)
    assert "cause" not in across.details


def test_noisy_tpot_is_not_drift() -> None:
    samples = tpot_samples(lambda t: 0.02, 1400, seed=1)
    assert flagged_times(DriftDetector(CONFIG, "tpot_p50"), samples) == []


def test_drift_needs_ten_baseline_and_three_recent_values() -> None:
    baseline = [Sample(time=float(t), ttft_p50=0.1) for t in range(0, 20, 2)]
    recent = [Sample(time=t, ttft_p50=1.0) for t in (50.0, 52.0, 54.0)]
    gap = [Sample(time=56.0, ttft_p50=None)]
    detector = DriftDetector(CONFIG, "ttft_p50")
    assert detector.observe(baseline[1:] + recent + gap, now=60.0) == []
    assert detector.observe(baseline + recent[1:] + gap, now=60.0) == []
    (finding,) = detector.observe(baseline + recent + gap, now=60.0)
    assert finding.details["baseline_std"] == 0.0
    assert finding.details["threshold"] == pytest.approx(0.125)
    with pytest.raises(ValueError):
        DriftDetector(CONFIG, "tpot_p51")


def test_broken_pool_invariants_are_critical() -> None:
    healthy = Sample(time=0.0)
    broken = Sample(time=2.0, pool_violations=["block 3 free twice", "ref_cnt -1 on block 9"])
    detector = InvariantDetector()
    assert detector.observe([healthy], now=0.0) == []
    assert detector.observe([broken, healthy], now=2.0) == []
    assert detector.observe([healthy, broken], now=2.0) == [
        Finding(
            "pool_invariant",
            "engine",
            "critical",
            "KV pool invariant broken (2 violations): block 3 free twice",
            {"violation": "block 3 free twice", "count": 2},
        )
    ]


def estimate(slope: float) -> SlopeEstimate:
    return SlopeEstimate(slope, 0.0, slope, slope, 0.0, 10)


def test_forecast_seconds() -> None:
    assert forecast_seconds(estimate(1024.0), 1 << 20, 2 << 20) == 1024.0
    assert forecast_seconds(estimate(0.5), 100, 101) == 2.0
    assert forecast_seconds(estimate(1024.0), 3 << 20, 2 << 20) == 0.0
    assert forecast_seconds(estimate(0.0), 1, 2) is None
    assert forecast_seconds(estimate(-5.0), 1, 2) is None
    assert forecast_seconds(None, 1, 2) is None
    assert forecast_seconds(estimate(1.0), 1, None) is None
    assert forecast_seconds(estimate(1.0), None, 2) is None
