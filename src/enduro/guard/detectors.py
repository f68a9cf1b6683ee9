"""Detectors: pure objects that read the guard's samples and say which problems are present.

A Finding means "this problem is present now"; the caller turns a finding's appearance and
disappearance into alert and resolved events, and the remediation ladder into actions.
Samples are in time order and none is later than `now`.
"""

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

from enduro.config import GuardConfig
from enduro.guard.sample import Sample
from enduro.guard.stats import SlopeEstimate, theil_sen

PROCESSES = ("engine", "api")
LEAK_MIN_POINTS = 10
DRIFT_MIN_BASELINE = 10
DRIFT_MIN_RECENT = 3
# A drift counts as CPU contention when the engine's threads waited this much longer for a
# CPU per second than in the baseline (a quarter of a core; uncontended, the default model's
# two threads wait ≈0.03 s per second).
CONTENTION_WAIT_RATE = 0.25
CPU_CONTENTION = "cpu_contention"
SAMPLE_FIELDS = frozenset(f.name for f in fields(Sample))

Details = dict[str, float | int | str | None]


@dataclass(frozen=True)
class Finding:
    detector: str
    """What kind of problem: memory_leak, latency_drift, pool_invariant, ..."""
    process: str | None
    """The process it is in (engine or api), None when it is the server's as a whole."""
    severity: str
    """warning or critical."""
    message: str
    """One readable sentence with the figures."""
    details: Details = field(default_factory=dict)


class Detector(Protocol):
    def observe(self, samples: Sequence[Sample], now: float) -> list[Finding]: ...


class LeakDetector:
    """Memory that keeps growing: a significant Theil–Sen trend above leak_threshold.

    The fit uses the last guard_window seconds of the current process, after guard_warmup
    (loading, first allocations and warm caches grow memory without leaking). A one-off step
    (a bigger batch, a new cache level) also makes a significant trend across the window, so
    a leak must also be a significant rise (p < leak_p_value) within the older half of the
    points and within the newer half on its own: a step lies in one half at most, and the
    other half is flat. The price is latency: a leak is flagged once each half shows it.
    And it must have added leak_min_growth bytes over the fitted span: a rate alone calls a
    small settling creep on a smooth series a leak.
    """

    def __init__(self, config: GuardConfig, process: str) -> None:
        if process not in PROCESSES:
            raise ValueError(f"process must be one of {', '.join(PROCESSES)}")
        self.config = config
        self.process = process
        self._field = f"{process}_memory_bytes"

    def estimate(self, samples: Sequence[Sample], now: float) -> SlopeEstimate | None:
        """The memory fit (bytes per second), significant or not; None with too few points."""
        return self._fit(self._points(samples, now))

    def observe(self, samples: Sequence[Sample], now: float) -> list[Finding]:
        points = self._points(samples, now)
        fit = self._fit(points)
        if fit is None or not self._is_leak(fit, points) or not self._rises_in_both_halves(points):
            return []
        return [self._finding(points, fit)]

    def _points(self, samples: Sequence[Sample], now: float) -> list[Sample]:
        start = self._process_start(samples)
        if start is None:
            return []
        since = max(now - self.config.guard_window, start + self.config.guard_warmup)
        return [
            s for s in samples if since <= s.time <= now and getattr(s, self._field) is not None
        ]

    def _process_start(self, samples: Sequence[Sample]) -> float | None:
        """When the fitted process began: the first sample, or for the engine the first of
        the latest run of samples with the current pid (a new pid is a new process)."""
        if not samples:
            return None
        if self.process == "api":
            return samples[0].time
        current = samples[-1].engine_pid
        start = samples[-1].time
        for sample in reversed(samples):
            if sample.engine_pid != current:
                break
            start = sample.time
        return start

    def _memory(self, points: Sequence[Sample]) -> list[float]:
        """Memory that no pool accounts for: the engine's KV segments are memory it owns and
        gives back (grown under load, released when idle), and the free pages its allocator
        keeps for reuse (`engine_malloc_held_bytes`: up to a step's working set, purged every
        30 s, engine/page_purge.py) are memory nothing holds; both are taken out, and what is
        left growing is a leak. The kept pages follow the largest recent steps, so with them
        in, longer agent contexts read as a leak of several hundred MiB/h."""
        if self.process == "engine":
            # The heartbeat's own reading when there is one: the kept pages swing by a step's
            # working set at each purge, and an RSS read apart from them spikes after one.
            return [
                float(s.engine_live_memory_bytes)
                if s.engine_live_memory_bytes is not None
                else float(s.engine_memory_bytes or 0)
                - (s.kv_cache_bytes or 0)
                - (s.engine_malloc_held_bytes or 0)
                for s in points
            ]
        return [float(getattr(s, self._field)) for s in points]

    def _fit(self, points: Sequence[Sample]) -> SlopeEstimate | None:
        if len(points) < LEAK_MIN_POINTS:
            return None
        return theil_sen([s.time for s in points], self._memory(points))

    def _is_leak(self, fit: SlopeEstimate, points: Sequence[Sample]) -> bool:
        fast = fit.slope * 3600 > self.config.leak_threshold
        grown = fit.slope * (points[-1].time - points[0].time) >= self.config.leak_min_growth
        return fast and grown and fit.p_value < self.config.leak_p_value

    def _rises_in_both_halves(self, points: Sequence[Sample]) -> bool:
        middle = len(points) // 2
        for half in (points[:middle], points[middle:]):
            fit = theil_sen([s.time for s in half], self._memory(half))
            if fit is None or fit.slope <= 0 or fit.p_value >= self.config.leak_p_value:
                return False
        return True

    def _bytes_per_request(self, points: Sequence[Sample]) -> float | None:
        fit = theil_sen([s.num_requests for s in points], self._memory(points))
        return None if fit is None else fit.slope

    def _finding(self, points: Sequence[Sample], fit: SlopeEstimate) -> Finding:
        per_request = self._bytes_per_request(points)
        message = (
            f"{self.process} memory grows {_mib(fit.slope * 3600)}/hour "
            f"(95% interval {_mib(fit.low * 3600)} to {_mib(fit.high * 3600)}, "
            f"p={fit.p_value:.1g}, {fit.num_points} samples)"
        )
        if per_request is not None:
            message += f", about {per_request / 1024:.1f} KiB per request"
        details: Details = {
            "slope_bytes_per_hour": fit.slope * 3600,
            "low_bytes_per_hour": fit.low * 3600,
            "high_bytes_per_hour": fit.high * 3600,
            "p_value": fit.p_value,
            "num_points": fit.num_points,
            "bytes_per_request": per_request,
        }
        return Finding("memory_leak", self.process, "warning", message + ".", details)


class DriftDetector:
    """Latency that rose: the mean of the last drift_recent seconds against the mean and
    (sample) standard deviation of the drift_baseline seconds before them.

    The baseline trails the recent window, so a lasting rise is absorbed into it: the
    finding clears once enough raised values have entered the baseline to widen its spread.
    """

    def __init__(self, config: GuardConfig, series: str) -> None:
        if series not in SAMPLE_FIELDS:
            raise ValueError(f"{series!r} is not a Sample field")
        self.config = config
        self.series = series

    def observe(self, samples: Sequence[Sample], now: float) -> list[Finding]:
        recent_start = now - self.config.drift_recent
        baseline_start = recent_start - self.config.drift_baseline
        baseline = self._values(samples, baseline_start, recent_start)
        recent = self._values(samples, recent_start, now, include_end=True)
        if len(baseline) < DRIFT_MIN_BASELINE or len(recent) < DRIFT_MIN_RECENT:
            return []
        baseline_mean = statistics.fmean(baseline)
        baseline_std = statistics.stdev(baseline)
        threshold = max(
            baseline_mean + self.config.drift_k * baseline_std,
            (1 + self.config.drift_min_increase) * baseline_mean,
        )
        recent_mean = statistics.fmean(recent)
        if recent_mean <= threshold:
            return []
        message = (
            f"{self.series} averaged {recent_mean * 1000:.1f} ms over the last "
            f"{self.config.drift_recent:g} s, above its {threshold * 1000:.1f} ms threshold "
            f"(baseline {baseline_mean * 1000:.1f} ± {baseline_std * 1000:.1f} ms)."
        )
        details: Details = {
            "series": self.series,
            "baseline_mean": baseline_mean,
            "baseline_std": baseline_std,
            "recent_mean": recent_mean,
            "threshold": threshold,
        }
        baseline_wait = _wait_rate(samples, baseline_start, recent_start)
        recent_wait = _wait_rate(samples, recent_start, now)
        if recent_wait is not None:
            details["cpu_wait_rate"] = recent_wait
            details["baseline_cpu_wait_rate"] = baseline_wait
        if (
            recent_wait is not None
            and baseline_wait is not None
            and recent_wait - baseline_wait > CONTENTION_WAIT_RATE
        ):
            details["cause"] = CPU_CONTENTION
            message = message.removesuffix(".") + (
                f"; the engine's threads waited {recent_wait:.2f} s per second for a CPU "
                f"(baseline {baseline_wait:.2f}): contention from outside the server."
            )
        return [Finding("latency_drift", None, "warning", message, details)]

    def _values(
        self, samples: Sequence[Sample], start: float, end: float, include_end: bool = False
    ) -> list[float]:
        values = []
        for sample in samples:
            value = getattr(sample, self.series)
            before_end = sample.time <= end if include_end else sample.time < end
            if value is not None and start <= sample.time and before_end:
                values.append(float(value))
        return values


def _wait_rate(samples: Sequence[Sample], start: float, end: float) -> float | None:
    """The engine's run-queue wait per second of wall time over [start, end]: from the first
    to the last reading in it, when both come from the same worker (a new one starts its
    count again)."""
    points = [
        s for s in samples if start <= s.time <= end and s.engine_cpu_wait_seconds is not None
    ]
    if len(points) < 2 or points[0].engine_pid != points[-1].engine_pid:
        return None
    first, last = points[0], points[-1]
    assert first.engine_cpu_wait_seconds is not None and last.engine_cpu_wait_seconds is not None
    if last.time <= first.time:
        return None
    return max(last.engine_cpu_wait_seconds - first.engine_cpu_wait_seconds, 0.0) / (
        last.time - first.time
    )


class InvariantDetector:
    """The KV pool's invariants broke (the engine reports them in each sample)."""

    def observe(self, samples: Sequence[Sample], now: float) -> list[Finding]:
        if not samples or not samples[-1].pool_violations:
            return []
        violations = samples[-1].pool_violations
        message = f"KV pool invariant broken ({len(violations)} violations): {violations[0]}"
        details: Details = {"violation": violations[0], "count": len(violations)}
        return [Finding("pool_invariant", "engine", "critical", message, details)]


def forecast_seconds(
    estimate: SlopeEstimate | None, current_bytes: int | None, limit_bytes: int | None
) -> float | None:
    """Seconds until memory reaches the limit at the fitted slope (bytes per second).

    0.0 when already at or over the limit; None when a figure is missing or memory is not
    growing.
    """
    if estimate is None or current_bytes is None or limit_bytes is None:
        return None
    if current_bytes >= limit_bytes:
        return 0.0
    if estimate.slope <= 0:
        return None
    return (limit_bytes - current_bytes) / estimate.slope


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / (1 << 20):.1f} MiB"
