from collections.abc import Sequence

from enduro.config import GuardConfig
from enduro.guard.detectors import CPU_CONTENTION, Finding
from enduro.guard.ladder import RemediationLadder, Remedy

CONFIG = GuardConfig(guard_cooldown=30.0, recycle_interval=300.0)


def finding(detector: str, process: str | None = None) -> Finding:
    return Finding(detector, process, "warning", f"{detector} present", {})


ENGINE_LEAK = finding("memory_leak", "engine")
API_LEAK = finding("memory_leak", "api")
DRIFT = finding("latency_drift")


def run(
    ladder: RemediationLadder, timeline: Sequence[tuple[float, Sequence[Finding]]]
) -> list[tuple[float, list[str]]]:
    """decide() at each time; the actions returned, as "action for reason"."""
    return [
        (now, [f"{r.action} for {r.reason}" for r in ladder.decide(findings, now)])
        for now, findings in timeline
    ]


def test_a_persisting_engine_leak_climbs_to_recycle_and_repeats_it() -> None:
    times = [0.0, 10.0, 30.0, 40.0, 60.0, 90.0, 359.0, 360.0, 390.0]
    assert run(RemediationLadder(CONFIG), [(t, [ENGINE_LEAK]) for t in times]) == [
        (0.0, ["trim for memory_leak:engine"]),
        (10.0, []),  # cooldown
        (30.0, ["collect for memory_leak:engine"]),
        (40.0, []),
        (60.0, ["recycle for memory_leak:engine"]),
        (90.0, []),  # the top rung again, but recycles are 300 s apart
        (359.0, []),
        (360.0, ["recycle for memory_leak:engine"]),
        (390.0, []),
    ]


def test_a_problem_that_clears_starts_again_at_the_bottom() -> None:
    timeline = [(0.0, [ENGINE_LEAK]), (30.0, [ENGINE_LEAK]), (40.0, []), (50.0, [ENGINE_LEAK])]
    assert run(RemediationLadder(CONFIG), timeline) == [
        (0.0, ["trim for memory_leak:engine"]),
        (30.0, ["collect for memory_leak:engine"]),
        (40.0, []),
        (50.0, ["trim for memory_leak:engine"]),
    ]


def test_rate_limits_are_shared_across_problems() -> None:
    timeline = [
        (0.0, [ENGINE_LEAK]),
        (5.0, [ENGINE_LEAK, DRIFT]),  # trim ran 5 s ago: drift waits
        (10.0, [ENGINE_LEAK, DRIFT]),
        (30.0, [ENGINE_LEAK, DRIFT]),
        (40.0, [ENGINE_LEAK, DRIFT]),  # collect ran 10 s ago: drift waits
        (60.0, [ENGINE_LEAK, DRIFT]),
    ]
    assert run(RemediationLadder(CONFIG), timeline) == [
        (0.0, ["trim for memory_leak:engine"]),
        (5.0, []),
        (10.0, ["trim for latency_drift"]),
        (30.0, ["collect for memory_leak:engine"]),
        (40.0, []),
        (60.0, ["recycle for memory_leak:engine", "collect for latency_drift"]),
    ]


def test_one_action_serves_every_problem_that_wants_it() -> None:
    both = [ENGINE_LEAK, API_LEAK]
    timeline = [(0.0, both), (30.0, both), (60.0, both), (90.0, both)]
    assert run(RemediationLadder(CONFIG), timeline) == [
        (0.0, ["trim for memory_leak:engine", "collect for memory_leak:api"]),
        (30.0, ["collect for memory_leak:engine"]),
        (60.0, ["recycle for memory_leak:engine"]),  # the API leak has no rung left
        (90.0, []),
    ]


def test_an_api_leak_gets_one_collect_only() -> None:
    times = [0.0, 30.0, 60.0, 400.0, 1000.0]
    assert run(RemediationLadder(CONFIG), [(t, [API_LEAK]) for t in times]) == [
        (0.0, ["collect for memory_leak:api"]),
        (30.0, []),
        (60.0, []),
        (400.0, []),
        (1000.0, []),
    ]


def test_broken_invariants_and_stalls_go_straight_to_recycle() -> None:
    pool = finding("pool_invariant", "engine")
    stall = finding("engine_stall")
    ladder = RemediationLadder(CONFIG)
    assert ladder.decide([pool], now=0.0) == [Remedy("recycle", "pool_invariant:engine")]
    assert ladder.decide([pool, stall], now=30.0) == []
    assert ladder.decide([stall], now=300.0) == [Remedy("recycle", "engine_stall")]


def test_unknown_detectors_get_no_action() -> None:
    ladder = RemediationLadder(CONFIG)
    assert ladder.decide([finding("fd_growth", "api")], now=0.0) == []


def test_a_drift_from_cpu_contention_is_only_reported() -> None:
    # Trimming or recycling cannot give the engine CPUs another process holds; the drift
    # stays an alert, without actions, while the cause lasts.
    contention = Finding(
        "latency_drift", None, "warning", "drift", {"cause": CPU_CONTENTION, "cpu_wait_rate": 0.9}
    )
    ladder = RemediationLadder(CONFIG)
    assert run(ladder, [(t, [contention]) for t in (0.0, 40.0, 80.0, 400.0)]) == [
        (0.0, []),
        (40.0, []),
        (80.0, []),
        (400.0, []),
    ]
    # The same drift without the cause climbs the engine's ladder as before.
    assert run(ladder, [(500.0, [DRIFT])]) == [(500.0, ["trim for latency_drift"])]
