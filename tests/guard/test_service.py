"""The guard's loop over a stand-in engine: findings become alert and resolved events, heal
mode climbs the ladder through the engine's commands, observe mode never acts, and every
event is a metric and a log line too."""

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from enduro.config import GuardConfig
from enduro.guard.detectors import Finding
from enduro.guard.events import EventLog
from enduro.guard.service import Guard
from enduro.server.ipc import EngineStats

MIB = 1 << 20


class LeakyEngine:
    """A stand-in for EngineClient with no process behind it: the sampler's memory readings
    are patched (`fake_memory`), commands and recycles are recorded."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None
        self.pid: int | None = 4242
        self.is_ready = True
        self.is_healthy = True
        self.commands: list[str] = []
        self.recycles = 0

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        self.commands.append(name)
        return {"evicted_blocks": 0, "moved_blocks": 0, "released_segments": []}

    async def recycle(self, drain_timeout: float = 300.0) -> int:
        self.recycles += 1
        self.pid = 5000 + self.recycles
        return self.pid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Guard, LeakyEngine, Clock]:
    engine, clock = LeakyEngine(), Clock()
    config = GuardConfig(guard=mode, guard_warmup=0, guard_cooldown=10, recycle_interval=60)
    memory = {"engine": 500 * MIB}

    def fake_memory(pid: int | None = None) -> int:
        # The engine grows 1 MiB a second (a leak); the API process holds still.
        return memory["engine"] + int(clock.now - 1000) * MIB if pid else 100 * MIB

    monkeypatch.setattr("enduro.guard.sampler.anon_memory_bytes", fake_memory)
    return Guard(config, engine, CollectorRegistry(), clock), engine, clock


async def run_for(g: Guard, clock: Clock, seconds: int) -> None:
    for _ in range(seconds // 2):
        clock.now += 2
        await g.tick()
        await asyncio.sleep(0)  # a recycle runs as a task of its own


@pytest.mark.asyncio
async def test_heal_climbs_the_ladder_for_an_engine_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    g, engine, clock = guard("heal", monkeypatch)
    await run_for(g, clock, 70)
    await g.stop()
    kinds = [(e.kind, e.name, e.process) for e in g.events.recent()]
    assert kinds[0] == ("alert", "memory_leak", "engine")
    actions = [e.name for e in g.events.recent() if e.kind == "action"]
    assert actions[:3] == ["trim", "collect", "recycle"]
    assert engine.commands[:2] == ["trim", "collect"] and engine.recycles == 1
    alert = g.events.recent()[0]
    assert alert.details["slope_bytes_per_hour"] == pytest.approx(3600 * MIB, rel=1e-6)


@pytest.mark.asyncio
async def test_observe_mode_alerts_but_never_acts(monkeypatch: pytest.MonkeyPatch) -> None:
    g, engine, clock = guard("observe", monkeypatch)
    await run_for(g, clock, 70)
    assert [e.kind for e in g.events.recent()] == ["alert"]
    assert engine.commands == [] and engine.recycles == 0
    report = g.report()
    assert report["leak"]["engine"]["slope_bytes_per_hour"] == pytest.approx(3600 * MIB)
    assert report["leak"]["api"]["slope_bytes_per_hour"] == 0
    limit = report["memory_limit_bytes"]
    current = (
        report["samples"][-1]["api_memory_bytes"] + report["samples"][-1]["engine_memory_bytes"]
    )
    assert report["forecast_seconds"] == pytest.approx((limit - current) / MIB)


class Flapping:
    """A detector whose finding comes and goes every other sample, as a slope at its
    significance level does, until `quiet_from`."""

    def __init__(self, quiet_from: float) -> None:
        self.quiet_from = quiet_from
        self.calls = 0

    def observe(self, samples: Any, now: float) -> list[Finding]:
        self.calls += 1
        if now >= self.quiet_from or self.calls % 2:
            return []
        return [Finding("memory_leak", "engine", "warning", "grows", {})]


@pytest.mark.asyncio
async def test_an_alert_resolves_only_after_a_quiet_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g, _, clock = guard("observe", monkeypatch)
    # Samples every 2 s from t+2; the finding is there on every other one, last at t+36.
    g.detectors = [Flapping(quiet_from=clock.now + 38)]
    await run_for(g, clock, 40)  # flapping: one alert, held while it flaps
    assert [e.kind for e in g.events.recent()] == ["alert"]
    assert ("memory_leak", "engine") in g.active
    await run_for(g, clock, 54)  # 58 s since last seen: still held
    assert [e.kind for e in g.events.recent()] == ["alert"]
    await run_for(g, clock, 2)  # 60 s undetected: resolved
    assert [e.kind for e in g.events.recent()] == ["alert", "resolved"]
    assert g.active == {}


def test_an_event_is_a_metric_and_a_json_log_line(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    events = EventLog(registry, clock=lambda: 123.0)
    with caplog.at_level(logging.INFO, logger="enduro.guard"):
        events.record("alert", "memory_leak", "grows", process="engine", details={"name": 1})
        events.record("action", "recycle", "failed", failed=True)
    assert [(e.id, e.time, e.kind) for e in events.recent()] == [
        (1, 123.0, "alert"),
        (2, 123.0, "action"),
    ]
    alerts = registry.get_sample_value(
        "enduro_guard_alerts_total", {"detector": "memory_leak", "process": "engine"}
    )
    failed = registry.get_sample_value(
        "enduro_guard_actions_total", {"action": "recycle", "outcome": "failed"}
    )
    assert (alerts, failed) == (1.0, 1.0)
    first = caplog.records[0]
    assert first.__dict__["event"] == "guard_alert"
    assert first.__dict__["guard_process"] == "engine" and first.__dict__["detail_name"] == 1
