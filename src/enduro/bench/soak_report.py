"""The soak's report: its time series as CSV and PNGs, and the verdict as JSON and markdown.

The verdict passes when no request failed, memory (API + engine, the KV pool excluded)
shows no significant growth above the allowed slope after warm-up (a slope that adds less
than a minimum over the fitted span is not counted, as in the guard's leak detector), p99
TTFT and p99 TPOT did not drift up by more than the allowed share between the first and the
last 10 % of the time after warm-up (each p99 over the requests that finished in that
tenth, pooled), and (unless told otherwise) the server raised no alert. PNGs use
matplotlib's object API (`Figure` saved through the Agg canvas): no pyplot, so no global
figure state and no display.
"""

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from enduro.guard.stats import percentile, theil_sen

MIB = float(1 << 20)
EDGE_SHARE = 0.1
"""Share of the time after warm-up at each end of the run compared for latency drift."""
SIGNIFICANCE = 0.01
"""A memory slope with a Mann–Kendall p-value at or above this is not a trend."""
PLOTS = ("memory.png", "latency.png", "throughput.png", "kv_cache.png")


@dataclass(frozen=True)
class Row:
    """One interval of the soak: what finished in it, and the server's figures at its end."""

    time: float  # unix seconds at the end of the interval
    elapsed: float  # seconds since the load started
    num_ok: int
    num_failed: int  # 5xx, connection errors, unexpected statuses, error frames mid-stream
    num_expected_errors: int  # invalid requests answered with the 400 they should get
    num_aborted: int  # streams the client closed on purpose
    ttft_p50: float | None  # seconds, over streams finished in the interval
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    output_tokens_per_s: float
    api_memory_bytes: float | None = None  # None: the server did not report it
    engine_memory_bytes: float | None = None
    # What the engine's malloc callers hold, and what malloc keeps besides (freed, not returned).
    engine_malloc_allocated_bytes: float | None = None
    engine_malloc_held_bytes: float | None = None
    kv_usage: float | None = None
    kv_fragmentation: float | None = None
    prefix_cache_hit_rate: float | None = None  # share of the interval's looked-up prompt tokens
    kv_cache_bytes: float | None = None
    engine_restarts: float | None = None
    # The engine's steps in the interval: mean duration, and what a step computed on average
    # (tokens generated, prompt tokens prefilled). None: no step, or a new worker's counters.
    step_ms: float | None = None
    decode_tokens_per_step: float | None = None
    prefill_tokens_per_step: float | None = None

    @property
    def total_memory_bytes(self) -> float | None:
        """API + engine, less the KV pool's segments (memory the pool owns, grows under load
        and gives back when idle; a leak is what grows besides it); None unless both
        processes were read."""
        if self.api_memory_bytes is None or self.engine_memory_bytes is None:
            return None
        return self.api_memory_bytes + self.engine_memory_bytes - (self.kv_cache_bytes or 0.0)

    @property
    def live_memory_bytes(self) -> float | None:
        """total_memory_bytes less the free pages the engine's allocator keeps for reuse
        (engine_malloc_held_bytes, purged every 30 s: engine/page_purge.py): what the guard's
        leak detector fits too. Those pages follow the largest recent steps, not a leak."""
        total = self.total_memory_bytes
        if total is None:
            return None
        return total - (self.engine_malloc_held_bytes or 0.0)


@dataclass(frozen=True)
class RequestSample:
    """One request that finished normally (not aborted, not an error)."""

    elapsed: float  # seconds since the load started, when it finished
    ttft: float | None  # seconds; None when not streamed
    tpot: float | None  # seconds per output token after the first; None for < 2 tokens


@dataclass(frozen=True)
class VerdictCriteria:
    warmup: float  # seconds at the start left out of the memory fit and the drift
    max_memory_slope: float  # bytes per hour
    max_drift: float  # relative rise of p99 TTFT / TPOT allowed
    fail_on_alert: bool
    # Bytes the fitted slope must add over the fitted span before it counts, the guard's
    # leak_min_growth rule: over a few minutes a settling creep of a few MiB has a slope
    # far above any hourly threshold without being a leak.
    min_memory_growth: float = 16 * MIB


@dataclass(frozen=True)
class RunInfo:
    workload: str
    concurrency: int
    duration: float  # seconds
    start_time: float  # unix seconds when the load started
    command_line: str = ""


@dataclass(frozen=True)
class MemoryTrend:
    slope: float  # bytes per hour, Theil–Sen
    low: float  # 95 % confidence interval of the slope, bytes per hour
    high: float
    p_value: float  # Mann–Kendall, "no monotonic trend"
    num_points: int
    span: float = 0.0  # seconds between the first and the last fitted reading

    @property
    def growth(self) -> float:
        """Bytes the slope adds over the fitted span."""
        return self.slope / 3600.0 * self.span


@dataclass(frozen=True)
class Drift:
    first: float | None  # p99 over the requests of the first EDGE_SHARE after warm-up
    last: float | None  # the same over the last EDGE_SHARE
    relative: float | None  # (last - first) / first
    # 95 % bootstrap interval of `relative`: the p99 of a few dozen requests is close to
    # their maximum, so one slow request moves it; the interval says how much that matters.
    low: float | None = None
    high: float | None = None
    num_first: int = 0  # requests in each window
    num_last: int = 0


@dataclass(frozen=True)
class StepTrend:
    """The engine's mean step time as a + b·decode tokens + c·prefill tokens per step +
    d·hours, fitted over the intervals after warm-up: d is how much slower a step of the same
    batch got per hour (the engine's own slowdown, apart from the workload's mix)."""

    per_hour: float  # d, milliseconds per hour
    low: float  # 95 % confidence interval of d
    high: float
    base_ms: float  # the fitted step time at the mean batch, at the start
    num_points: int


@dataclass(frozen=True)
class RequestCounts:
    ok: int
    failed: int
    expected_errors: int
    aborted: int


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str]
    run: RunInfo
    criteria: VerdictCriteria
    requests: RequestCounts
    memory: MemoryTrend | None  # None: too few memory readings after warm-up
    ttft_p99_drift: Drift
    tpot_p99_drift: Drift
    alerts: list[dict[str, Any]]
    events: list[dict[str, Any]]
    error_samples: list[str]
    engine_malloc: dict[str, MemoryTrend] = field(default_factory=dict)
    """Slopes of the engine's malloc figures ("allocated", "held"): not criteria, but what
    tells live growth from allocator retention when the memory slope fails."""
    step_time: StepTrend | None = None
    """Not a criterion: whether a latency drift is the engine's steps getting slower."""
    resident_memory: MemoryTrend | None = None
    """Not a criterion: the slope with the allocator's kept free pages in (API + engine, KV
    pool excluded), the figure the memory criterion used before the engine kept them."""


# Row fields whose trends split the engine's memory (`Verdict.engine_malloc`).
MALLOC_FIELDS = {
    "allocated": "engine_malloc_allocated_bytes",
    "held": "engine_malloc_held_bytes",
}


def memory_trend(rows: Sequence[Row], field_name: str | None = None) -> MemoryTrend | None:
    """Theil–Sen slope of a memory figure over elapsed time: `field_name` of the rows, or by
    default API + engine memory (API alone when the server never reported an engine); rows
    missing a reading are skipped."""
    if field_name is None:
        with_engine = any(row.engine_memory_bytes is not None for row in rows)
        field_name = "live_memory_bytes" if with_engine else "api_memory_bytes"
    points = [(row.elapsed, getattr(row, field_name)) for row in rows]
    known = [(x, y) for x, y in points if y is not None]
    estimate = theil_sen([x for x, _ in known], [y for _, y in known])
    if estimate is None:
        return None
    per_hour = 3600.0
    return MemoryTrend(
        estimate.slope * per_hour,
        estimate.low * per_hour,
        estimate.high * per_hour,
        estimate.p_value,
        estimate.num_points,
        known[-1][0] - known[0][0],
    )


def step_trend(rows: Sequence[Row]) -> StepTrend | None:
    """Least-squares fit of StepTrend over rows with step figures; None with too few rows
    for the four coefficients and an error estimate."""
    known = [
        (row.elapsed / 3600, row.decode_tokens_per_step, row.prefill_tokens_per_step, ms)
        for row in rows
        if (ms := row.step_ms) is not None
        and row.decode_tokens_per_step is not None
        and row.prefill_tokens_per_step is not None
    ]
    if len(known) < 8:
        return None
    data = np.array(known, dtype=np.float64)
    hours, decode, prefill, step_ms = data.T
    design = np.column_stack([np.ones(len(data)), decode, prefill, hours])
    coefficients, _, rank, _ = np.linalg.lstsq(design, step_ms, rcond=None)
    if rank < design.shape[1]:  # e.g. no prefill at all: the mix cannot be told apart
        return None
    residuals = step_ms - design @ coefficients
    variance = float(residuals @ residuals) / (len(data) - design.shape[1])
    covariance = variance * np.linalg.inv(design.T @ design)
    error = 1.96 * math.sqrt(float(covariance[3, 3]))
    slope = float(coefficients[3])
    base = float(coefficients[:3] @ [1.0, decode.mean(), prefill.mean()] + slope * hours[0])
    return StepTrend(slope, slope - error, slope + error, base, len(data))


def drift(samples: Sequence[RequestSample], key: str, start: float, end: float) -> Drift:
    """p99 of `key` ("ttft" or "tpot") over the requests that finished in the last EDGE_SHARE
    of [start, end] against those of the first. Pooling the requests of a whole tenth (rather
    than averaging each interval's p99) gives a p99 of many requests, not of a handful."""
    edge = EDGE_SHARE * (end - start)
    if edge <= 0:
        return Drift(None, None, None)

    def window(low: float, high: float) -> list[float]:
        values = (getattr(s, key) for s in samples if low < s.elapsed <= high)
        return [v for v in values if v is not None]

    first_values, last_values = window(start, start + edge), window(end - edge, end)
    first, last = percentile(first_values, 99), percentile(last_values, 99)
    counts = {"num_first": len(first_values), "num_last": len(last_values)}
    if first is None or last is None or first <= 0:
        return Drift(first, last, None, **counts)
    low, high = bootstrap_interval(first_values, last_values)
    return Drift(first, last, (last - first) / first, low, high, **counts)


BOOTSTRAP_ROUNDS = 2000


def bootstrap_interval(first: Sequence[float], last: Sequence[float]) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of (p99(last) - p99(first)) / p99(first): both
    windows resampled with replacement BOOTSTRAP_ROUNDS times (fixed seed: a report is
    reproducible from its data)."""
    rng = np.random.default_rng(0)
    a, b = np.asarray(first, dtype=np.float64), np.asarray(last, dtype=np.float64)
    p_first = np.percentile(rng.choice(a, (BOOTSTRAP_ROUNDS, len(a))), 99, axis=1)
    p_last = np.percentile(rng.choice(b, (BOOTSTRAP_ROUNDS, len(b))), 99, axis=1)
    positive = p_first > 0
    relative = (p_last[positive] - p_first[positive]) / p_first[positive]
    return float(np.percentile(relative, 2.5)), float(np.percentile(relative, 97.5))


def compute_verdict(
    rows: Sequence[Row],
    samples: Sequence[RequestSample],
    events: Sequence[dict[str, Any]],
    criteria: VerdictCriteria,
    run: RunInfo,
    error_samples: Sequence[str] = (),
) -> Verdict:
    settled = [row for row in rows if row.elapsed > criteria.warmup]
    counts = RequestCounts(
        ok=sum(row.num_ok for row in rows),
        failed=sum(row.num_failed for row in rows),
        expected_errors=sum(row.num_expected_errors for row in rows),
        aborted=sum(row.num_aborted for row in rows),
    )
    memory = memory_trend(settled)
    end = max(run.duration, rows[-1].elapsed if rows else 0.0)
    ttft = drift(samples, "ttft", criteria.warmup, end)
    tpot = drift(samples, "tpot", criteria.warmup, end)
    alerts = [dict(event) for event in events if event.get("kind") == "alert"]
    reasons = _failures(counts, memory, {"p99 TTFT": ttft, "p99 TPOT": tpot}, alerts, criteria)
    return Verdict(
        passed=not reasons,
        reasons=reasons,
        run=run,
        criteria=criteria,
        requests=counts,
        memory=memory,
        ttft_p99_drift=ttft,
        tpot_p99_drift=tpot,
        alerts=alerts,
        events=[dict(event) for event in events],
        error_samples=list(error_samples),
        engine_malloc={
            name: trend
            for name, field_name in MALLOC_FIELDS.items()
            if (trend := memory_trend(settled, field_name)) is not None
        },
        step_time=step_trend(settled),
        resident_memory=memory_trend(settled, "total_memory_bytes") if memory else None,
    )


def _failures(
    counts: RequestCounts,
    memory: MemoryTrend | None,
    drifts: dict[str, Drift],
    alerts: list[dict[str, Any]],
    criteria: VerdictCriteria,
) -> list[str]:
    reasons = []
    if counts.failed:
        reasons.append(f"{counts.failed} requests failed")
    if counts.ok == 0:
        reasons.append("no request succeeded")
    if (
        memory
        and memory.slope > criteria.max_memory_slope
        and memory.p_value < SIGNIFICANCE
        and memory.growth >= criteria.min_memory_growth
    ):
        reasons.append(
            f"memory grows {memory.slope / MIB:.1f} MiB/h (95 % CI {memory.low / MIB:.1f} to "
            f"{memory.high / MIB:.1f}, p = {memory.p_value:.2g}; {memory.growth / MIB:.1f} MiB "
            f"over {memory.span:.0f} s), above {criteria.max_memory_slope / MIB:.1f} MiB/h"
        )
    for name, figure in drifts.items():
        if figure.relative is not None and figure.relative > criteria.max_drift:
            reasons.append(
                f"{name} drifted {figure.relative:+.0%} (from {_ms(figure.first)} to "
                f"{_ms(figure.last)}), above {criteria.max_drift:+.0%}"
            )
    if alerts and criteria.fail_on_alert:
        names = sorted({str(alert.get("name")) for alert in alerts})
        reasons.append(f"{len(alerts)} alerts: {', '.join(names)}")
    return reasons


def write_report(
    directory: Path,
    rows: Sequence[Row],
    samples: Sequence[RequestSample],
    verdict: Verdict,
    events: Sequence[dict[str, Any]],
) -> None:
    """soak.csv, requests.csv, the PNGs, verdict.json and verdict.md into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(directory / "soak.csv", rows)
    write_csv(directory / "requests.csv", samples, RequestSample)
    write_plots(directory, rows, events, verdict.run.start_time)
    (directory / "verdict.json").write_text(json.dumps(asdict(verdict), indent=2) + "\n")
    (directory / "verdict.md").write_text(verdict_markdown(verdict))


def write_csv(path: Path, rows: Sequence[Row] | Sequence[RequestSample], kind: type = Row) -> None:
    """One line per record of dataclass `kind`; None cells empty."""
    names = [column.name for column in fields(kind)]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f} ms"


def _drift_cell(figure: Drift) -> str:
    change = "–" if figure.relative is None else f"{figure.relative:+.1%}"
    if figure.low is not None and figure.high is not None:
        change += f", 95 % CI {figure.low:+.0%} to {figure.high:+.0%}"
    counts = f"{figure.num_first} → {figure.num_last} requests"
    return f"{_ms(figure.first)} → {_ms(figure.last)} ({change}; {counts})"


def _slope_cell(trend: MemoryTrend) -> str:
    return (
        f"{trend.slope / MIB:+.2f} MiB/h (95 % CI {trend.low / MIB:+.2f} to "
        f"{trend.high / MIB:+.2f}, p = {trend.p_value:.2g}, {trend.num_points} points; "
        f"{trend.growth / MIB:+.1f} MiB over {trend.span:.0f} s)"
    )


def _step_cell(verdict: Verdict) -> str:
    trend = verdict.step_time
    if trend is None:
        return "– (too few readings)"
    return (
        f"{trend.per_hour:+.1f} ms/h (95 % CI {trend.low:+.1f} to {trend.high:+.1f}) from "
        f"{trend.base_ms:.1f} ms, {trend.num_points} intervals"
    )


def verdict_markdown(verdict: Verdict) -> str:
    run, counts, memory = verdict.run, verdict.requests, verdict.memory
    slope = "– (too few readings)" if memory is None else _slope_cell(memory)
    lines = [
        f"# Soak: {'PASS' if verdict.passed else 'FAIL'}",
        "",
        f"`{run.command_line}`" if run.command_line else "",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| workload | {run.workload}, concurrency {run.concurrency}, {run.duration:.0f} s |",
        f"| requests ok / failed | {counts.ok} / {counts.failed} |",
        f"| expected 400s / client aborts | {counts.expected_errors} / {counts.aborted} |",
        f"| memory slope (API + engine; KV pool, allocator's kept free pages excluded) | {slope} |",
        *[
            f"| resident memory slope, kept free pages in (not a criterion) | {_slope_cell(t)} |"
            for t in [verdict.resident_memory]
            if t is not None and verdict.engine_malloc
        ],
        *[
            f"| engine malloc {name} slope (not a criterion) | {_slope_cell(trend)} |"
            for name, trend in verdict.engine_malloc.items()
        ],
        f"| p99 TTFT, first → last 10 % | {_drift_cell(verdict.ttft_p99_drift)} |",
        f"| p99 TPOT, first → last 10 % | {_drift_cell(verdict.tpot_p99_drift)} |",
        f"| engine step time at the same batch (not a criterion) | {_step_cell(verdict)} |",
        f"| alerts | {len(verdict.alerts)} |",
        "",
        *[f"- {reason}" for reason in verdict.reasons],
        "",
        *[f"![{name.removesuffix('.png')}]({name})" for name in PLOTS],
        "",
    ]
    return "\n".join(lines)


# Plots -----------------------------------------------------------------------------------

Series = tuple[str, str, float]  # label, Row attribute, unit the values are divided by
MEMORY_SERIES: list[Series] = [
    ("api", "api_memory_bytes", MIB),
    ("engine", "engine_memory_bytes", MIB),
    ("api + engine", "total_memory_bytes", MIB),
    ("api + engine, live", "live_memory_bytes", MIB),
    ("engine malloc: allocated", "engine_malloc_allocated_bytes", MIB),
    ("engine malloc: held free", "engine_malloc_held_bytes", MIB),
]
PANELS: dict[str, tuple[str, list[tuple[str, list[Series]]]]] = {
    "memory.png": ("Memory", [("MiB", MEMORY_SERIES)]),
    "latency.png": (
        "Latency",
        [
            ("TTFT (ms)", [("p50", "ttft_p50", 1e-3), ("p99", "ttft_p99", 1e-3)]),
            ("TPOT (ms)", [("p50", "tpot_p50", 1e-3), ("p99", "tpot_p99", 1e-3)]),
        ],
    ),
    "throughput.png": (
        "Throughput and engine steps",
        [
            ("output tokens/s", [("tokens/s", "output_tokens_per_s", 1)]),
            ("step (ms)", [("mean step", "step_ms", 1)]),
            (
                "tokens per step",
                [
                    ("decode", "decode_tokens_per_step", 1),
                    ("prefill", "prefill_tokens_per_step", 1),
                ],
            ),
        ],
    ),
    "kv_cache.png": (
        "KV cache",
        [
            (
                "ratio",
                [
                    ("usage", "kv_usage", 1),
                    ("fragmentation", "kv_fragmentation", 1),
                    ("prefix-cache hit rate", "prefix_cache_hit_rate", 1),
                ],
            )
        ],
    ),
}


def write_plots(
    directory: Path, rows: Sequence[Row], events: Sequence[dict[str, Any]], start_time: float
) -> None:
    """One PNG per entry of PANELS against minutes since the start; the server's alerts as
    red dotted vertical lines, its actions as blue ones."""
    minutes = [row.elapsed / 60 for row in rows]
    for name, (title, panels) in PANELS.items():
        figure = Figure(figsize=(9, 2.5 + 2.5 * len(panels)))
        axes_list = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for axes, (ylabel, series) in zip(axes_list, panels, strict=True):
            for label, key, unit in series:
                values = [
                    math.nan if (v := getattr(row, key)) is None else v / unit for row in rows
                ]
                # Markers: a lone reading between gaps would not show as a line.
                axes.plot(minutes, values, marker=".", label=label)
            _mark_events(axes, events, start_time)
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            axes.legend(loc="upper left", fontsize="small")
        axes_list[0].set_title(title)
        axes_list[-1].set_xlabel("minutes since the start")
        figure.tight_layout()
        figure.savefig(directory / name, dpi=100)


def _mark_events(axes: Any, events: Sequence[dict[str, Any]], start_time: float) -> None:
    colors = {"alert": "tab:red", "action": "tab:blue"}
    labelled: set[str] = set()
    for event in events:
        kind = str(event.get("kind"))
        if kind not in colors or not isinstance(event.get("time"), int | float):
            continue
        label = None if kind in labelled else f"{kind}s"
        labelled.add(kind)
        minute = (event["time"] - start_time) / 60
        axes.axvline(minute, color=colors[kind], linestyle=":", alpha=0.8, label=label)
