import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from enduro.bench.soak_report import (
    MIB,
    PLOTS,
    Drift,
    RequestSample,
    Row,
    RunInfo,
    VerdictCriteria,
    compute_verdict,
    drift,
    verdict_markdown,
    write_report,
)

START = 1_700_000_000.0
RUN = RunInfo("mixed", 4, 100.0, START, "enduro soak --duration 100")
CRITERIA = VerdictCriteria(
    warmup=10.0, max_memory_slope=64 * MIB, max_drift=0.25, fail_on_alert=True
)


def rows(
    count: int = 100,
    memory: Any = lambda elapsed: 1000 * MIB,
    ttft: Any = lambda i: 0.25,
    tpot: Any = lambda i: 0.125,
    **fields: Any,
) -> list[Row]:
    """One row per second from 1 to `count` s; api holds a third of the memory, engine the rest."""
    result = []
    for i in range(count):
        elapsed = float(i + 1)
        total = memory(elapsed)
        row = Row(
            time=START + elapsed,
            elapsed=elapsed,
            num_ok=10,
            num_failed=0,
            num_expected_errors=1,
            num_aborted=2,
            ttft_p50=0.1,
            ttft_p99=ttft(i),
            tpot_p50=0.1,
            tpot_p99=tpot(i),
            output_tokens_per_s=500.0,
            api_memory_bytes=total / 3,
            engine_memory_bytes=total * 2 / 3,
            kv_usage=0.5,
            kv_fragmentation=0.0,
        )
        result.append(dataclasses.replace(row, **fields))
    return result


def samples(
    count: int = 100,
    ttft: Any = lambda i: 0.25,
    tpot: Any = lambda i: 0.125,
) -> list[RequestSample]:
    """One request finishing each second from 1 to `count` s."""
    return [RequestSample(float(i + 1), ttft(i), tpot(i)) for i in range(count)]


def test_flat_memory_passes() -> None:
    verdict = compute_verdict(rows(), samples(), [], CRITERIA, RUN)
    assert verdict.passed and verdict.reasons == []
    assert verdict.memory is not None and verdict.memory.slope == 0.0
    assert verdict.memory.num_points == 90  # the first 10 s are warm-up
    assert (verdict.requests.ok, verdict.requests.expected_errors) == (1000, 100)
    assert (verdict.requests.failed, verdict.requests.aborted) == (0, 200)


def test_a_memory_ramp_fails_with_its_slope() -> None:
    ramp = rows(memory=lambda elapsed: 1000 * MIB + elapsed * MIB)  # 1 MiB/s = 3600 MiB/h
    verdict = compute_verdict(ramp, samples(), [], CRITERIA, RUN)
    assert not verdict.passed
    assert verdict.memory is not None
    assert verdict.memory.slope == pytest.approx(3600 * MIB)
    assert verdict.memory.low <= verdict.memory.slope <= verdict.memory.high
    assert verdict.memory.p_value < 0.01
    assert verdict.reasons == [
        "memory grows 3600.0 MiB/h (95 % CI 3600.0 to 3600.0, p = "
        f"{verdict.memory.p_value:.2g}; 89.0 MiB over 89 s), above 64.0 MiB/h"
    ]


def test_a_steep_slope_that_adds_less_than_the_minimum_growth_passes() -> None:
    # 0.0625 MiB/s = 225 MiB/h, above 64 MiB/h and significant, but over the 89 s fitted it
    # adds 5.6 MiB, below the 16 MiB minimum: a short soak's settling creep, not a leak.
    creep = rows(memory=lambda elapsed: 1000 * MIB + elapsed * MIB / 16)
    verdict = compute_verdict(creep, samples(), [], CRITERIA, RUN)
    assert verdict.memory is not None
    assert verdict.memory.slope == pytest.approx(225 * MIB)
    assert verdict.memory.p_value < 0.01
    assert verdict.memory.span == 89.0
    assert verdict.memory.growth == pytest.approx(89 * MIB / 16)
    assert verdict.passed
    # The same series fails once the minimum is below what it added.
    strict = dataclasses.replace(CRITERIA, min_memory_growth=4 * MIB)
    assert compute_verdict(creep, samples(), [], strict, RUN).reasons == [
        "memory grows 225.0 MiB/h (95 % CI 225.0 to 225.0, p = "
        f"{verdict.memory.p_value:.2g}; 5.6 MiB over 89 s), above 64.0 MiB/h"
    ]


def test_free_pages_the_allocator_keeps_are_reported_but_not_judged() -> None:
    # The engine's allocator keeps 2 MiB/s more free pages (held) and its RSS rises with
    # them; what its callers hold (allocated) stays flat: no leak.
    kept = [
        dataclasses.replace(
            row,
            engine_memory_bytes=(row.engine_memory_bytes or 0.0) + row.elapsed * 2 * MIB,
            engine_malloc_allocated_bytes=400 * MIB,
            engine_malloc_held_bytes=100 * MIB + row.elapsed * 2 * MIB,
        )
        for row in rows()
    ]
    verdict = compute_verdict(kept, samples(), [], CRITERIA, RUN)
    assert verdict.passed and verdict.memory is not None and verdict.memory.slope == 0.0
    trends = verdict.engine_malloc
    assert list(trends) == ["allocated", "held"]
    assert trends["allocated"].slope == 0.0
    assert trends["held"].slope == pytest.approx(7200 * MIB)
    assert trends["held"].num_points == 90
    assert verdict.resident_memory is not None
    assert verdict.resident_memory.slope == pytest.approx(7200 * MIB)
    markdown = verdict_markdown(verdict)
    assert "| resident memory slope, kept free pages in (not a criterion) | +7200.00" in markdown
    assert "| engine malloc allocated slope (not a criterion) | +0.00 MiB/h" in markdown
    assert "| engine malloc held slope (not a criterion) | +7200.00 MiB/h" in markdown
    # Kept pages reused for live data at the same RSS: that is growth, and it fails.
    reused = [
        dataclasses.replace(
            row,
            engine_malloc_allocated_bytes=400 * MIB + row.elapsed * 2 * MIB,
            engine_malloc_held_bytes=300 * MIB - row.elapsed * 2 * MIB,
        )
        for row in rows()
    ]
    verdict = compute_verdict(reused, samples(), [], CRITERIA, RUN)
    assert verdict.memory is not None and verdict.memory.slope == pytest.approx(7200 * MIB)
    assert not verdict.passed


def test_without_malloc_figures_there_is_no_split() -> None:
    verdict = compute_verdict(rows(), samples(), [], CRITERIA, RUN)
    assert verdict.engine_malloc == {}
    assert "engine malloc" not in verdict_markdown(verdict)


def test_growth_during_warmup_is_not_counted() -> None:
    settling = rows(memory=lambda elapsed: min(elapsed, 10.0) * 100 * MIB)
    verdict = compute_verdict(settling, samples(), [], CRITERIA, RUN)
    assert verdict.passed and verdict.memory is not None and verdict.memory.slope == 0.0


def test_a_slope_without_significance_passes() -> None:
    # A saw tooth: steep between readings, but no monotonic trend.
    saw = rows(memory=lambda elapsed: (1000 + (elapsed % 2) * 500) * MIB)
    verdict = compute_verdict(saw, samples(), [], CRITERIA, RUN)
    assert verdict.memory is not None and verdict.memory.p_value >= 0.01
    assert verdict.passed


def test_memory_without_engine_figures_is_the_api_alone() -> None:
    api_only = rows(memory=lambda elapsed: elapsed * MIB, engine_memory_bytes=None)
    verdict = compute_verdict(api_only, samples(), [], CRITERIA, RUN)
    assert verdict.memory is not None
    assert verdict.memory.slope == pytest.approx(3600 * MIB / 3)


def test_drift_compares_the_first_and_last_tenth_after_warmup() -> None:
    # Rows 10..99 are after warm-up (elapsed > 10 s): 90 rows, so 9 at each end.
    ttft = lambda i: 0.5 if i >= 91 else 0.25  # noqa: E731
    tpot = lambda i: 0.15625 if i >= 91 else (9.0 if i < 10 else 0.125)  # noqa: E731
    verdict = compute_verdict(rows(), samples(ttft=ttft, tpot=tpot), [], CRITERIA, RUN)
    # Every request of a window alike: each resample has the same p99, the interval is a point.
    assert verdict.ttft_p99_drift == Drift(0.25, 0.5, 1.0, 1.0, 1.0, 9, 9)
    assert verdict.tpot_p99_drift == Drift(0.125, 0.15625, 0.25, 0.25, 0.25, 9, 9)
    assert verdict.reasons == ["p99 TTFT drifted +100% (from 250.0 ms to 500.0 ms), above +25%"]


def test_drift_takes_the_p99_of_the_pooled_requests() -> None:
    # Warm-up 10 s of 100: the tenths are (10, 19] and (91, 100], 9 requests each. The last
    # has one slow request: p99 interpolates at rank 0.99 * 8 = 7.92 between 0.1 and 1.0.
    ttft = lambda i: 1.0 if i == 99 else 0.1  # noqa: E731
    figure = drift(samples(ttft=ttft), "ttft", 10.0, 100.0)
    assert figure.first == pytest.approx(0.1)
    assert figure.last == pytest.approx(0.1 + 0.92 * 0.9)
    assert figure.relative == pytest.approx(8.28)
    # Resamples without the slow request (a share (8/9)^9 ≈ 35 %) show no drift; those with
    # it show +828 % or more: the interval spans both.
    assert figure.low == pytest.approx(0.0) and figure.high is not None and figure.high > 8.28
    assert (figure.num_first, figure.num_last) == (9, 9)


def test_drift_skips_missing_figures() -> None:
    sparse = samples(count=100, ttft=lambda i: 1.0 if i == 99 else None)
    assert drift(sparse, "ttft", 10.0, 100.0) == Drift(None, 1.0, None, num_last=1)
    assert drift(sparse, "ttft", 10.0, 10.0) == Drift(None, None, None)


def test_failed_requests_and_alerts_fail() -> None:
    failing = rows(count=20, num_failed=1, num_ok=0)
    events = [
        {"id": 1, "time": START + 5, "kind": "alert", "name": "memory_leak", "severity": "warn"},
        {"id": 2, "time": START + 6, "kind": "action", "name": "gc", "severity": "info"},
        {"id": 3, "time": START + 9, "kind": "resolved", "name": "memory_leak"},
    ]
    verdict = compute_verdict(failing, samples(), events, CRITERIA, RUN, ["20 × 500: boom"])
    assert verdict.reasons == [
        "20 requests failed",
        "no request succeeded",
        "1 alerts: memory_leak",
    ]
    assert [alert["id"] for alert in verdict.alerts] == [1]
    assert len(verdict.events) == 3 and verdict.error_samples == ["20 × 500: boom"]
    lenient = dataclasses.replace(CRITERIA, fail_on_alert=False)
    ok_rows = rows(count=20)
    assert compute_verdict(ok_rows, samples(), events, lenient, RUN).passed
    assert not compute_verdict(ok_rows, samples(), events, CRITERIA, RUN).passed


def test_report_files(tmp_path: Path) -> None:
    series = rows(count=30, kv_cache_bytes=None)
    events = [{"id": 1, "time": START + 12, "kind": "alert", "name": "ttft_drift"}]
    verdict = compute_verdict(series, samples(), events, CRITERIA, RUN)
    write_report(tmp_path / "report", series, samples(count=3), verdict, events)
    with (tmp_path / "report" / "soak.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == 30
    assert table[0]["elapsed"] == "1.0" and table[0]["kv_cache_bytes"] == ""
    assert float(table[0]["api_memory_bytes"]) == pytest.approx(1000 * MIB / 3)
    with (tmp_path / "report" / "requests.csv").open() as file:
        requests = list(csv.DictReader(file))
    assert requests[2] == {"elapsed": "3.0", "ttft": "0.25", "tpot": "0.125"}
    saved = json.loads((tmp_path / "report" / "verdict.json").read_text())
    assert saved["passed"] is False and saved["reasons"] == ["1 alerts: ttft_drift"]
    assert saved["run"]["command_line"] == "enduro soak --duration 100"
    assert saved["memory"]["slope"] == 0.0 and saved["requests"]["ok"] == 300
    markdown = (tmp_path / "report" / "verdict.md").read_text()
    assert markdown.startswith("# Soak: FAIL") and "- 1 alerts: ttft_drift" in markdown
    for name in PLOTS:
        assert f"]({name})" in markdown
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_trend_recovers_the_slowdown_at_the_same_batch() -> None:
    # 30 + 2·decode + 0.1·prefill ms, plus 3.6 ms per hour (0.001 ms a second); the batch mix
    # moves with time, so a plain trend of step time would blame the engine for it.
    def step_rows() -> list[Row]:
        return [
            dataclasses.replace(
                row,
                decode_tokens_per_step=(decode := 4.0 + i % 7),
                prefill_tokens_per_step=(prefill := 10.0 * (i % 5) + i),
                step_ms=30 + 2 * decode + 0.1 * prefill + 0.001 * row.elapsed,
            )
            for i, row in enumerate(rows())
        ]

    verdict = compute_verdict(step_rows(), samples(), [], CRITERIA, RUN)
    trend = verdict.step_time
    assert trend is not None and trend.num_points == 90
    assert trend.per_hour == pytest.approx(3.6, abs=1e-6)
    assert (trend.low, trend.high) == pytest.approx((3.6, 3.6), abs=1e-6)  # an exact fit
    mean_decode = sum(4.0 + i % 7 for i in range(10, 100)) / 90
    mean_prefill = sum(10.0 * (i % 5) + i for i in range(10, 100)) / 90
    expected_base = 30 + 2 * mean_decode + 0.1 * mean_prefill + 0.011
    assert trend.base_ms == pytest.approx(expected_base, abs=1e-6)
    assert "+3.6 ms/h" in verdict_markdown(verdict)


def test_step_trend_needs_readings_and_a_mix_it_can_tell_apart() -> None:
    assert compute_verdict(rows(), samples(), [], CRITERIA, RUN).step_time is None
    no_prefill = rows(step_ms=50.0, decode_tokens_per_step=8.0, prefill_tokens_per_step=0.0)
    assert compute_verdict(no_prefill, samples(), [], CRITERIA, RUN).step_time is None
    few = rows(15, step_ms=50.0, decode_tokens_per_step=8.0, prefill_tokens_per_step=1.0)
    assert compute_verdict(few, samples(15), [], CRITERIA, RUN).step_time is None
