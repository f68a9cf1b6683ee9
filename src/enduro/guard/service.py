"""The guard at work: sample, detect, alert, and (in heal mode) climb the remediation ladder.

Runs as one asyncio task in the API process during the app's lifespan. Detectors only read
samples; remedies act only through the engine's command interface (trim, collect) and the
client's recycle, as DESIGN.md decision 8 asks.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from enduro.config import GuardConfig
from enduro.guard.detectors import (
    DriftDetector,
    Finding,
    InvariantDetector,
    LeakDetector,
    forecast_seconds,
)
from enduro.guard.events import EventLog
from enduro.guard.introspection import collect_and_trim
from enduro.guard.ladder import RemediationLadder, Remedy
from enduro.guard.memory_limit import memory_limit_bytes
from enduro.guard.sample import Sample
from enduro.guard.sampler import EngineView, GuardSampler
from enduro.guard.stats import SlopeEstimate

log = logging.getLogger("enduro.guard")
RESOLVE_AFTER = 60.0
"""Seconds a problem must go undetected before its alert resolves (hysteresis)."""


class Detector(Protocol):
    def observe(self, samples: Sequence[Sample], now: float) -> list[Finding]: ...


class GuardedEngine(EngineView, Protocol):
    @property
    def is_ready(self) -> bool: ...

    @property
    def is_healthy(self) -> bool: ...

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]: ...

    async def recycle(self, drain_timeout: float = 300.0) -> int: ...


class Guard:
    def __init__(
        self,
        config: GuardConfig,
        engine: GuardedEngine,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock
        self.sampler = GuardSampler(engine, clock)
        self.events = EventLog(registry, clock)
        span = max(config.guard_window, config.drift_baseline + config.drift_recent)
        self.samples: deque[Sample] = deque(maxlen=int(span / config.guard_interval) + 16)
        self.leak_detectors = {p: LeakDetector(config, p) for p in ("engine", "api")}
        self.detectors: list[Detector] = [
            *self.leak_detectors.values(),
            DriftDetector(config, "tpot_p50"),
            DriftDetector(config, "ttft_p50"),
            InvariantDetector(),
        ]
        self.ladder = RemediationLadder(config)
        self.memory_limit = memory_limit_bytes(config.memory_limit)
        self.active: dict[tuple[str, str | None], Finding] = {}
        self.last_seen: dict[tuple[str, str | None], float] = {}
        self._background: set[asyncio.Task[None]] = set()
        registry.register(GuardCollector(self))

    @property
    def enabled(self) -> bool:
        return self.config.guard != "off"

    async def run(self) -> None:
        """Sample and judge every guard_interval until cancelled."""
        while True:
            await asyncio.sleep(self.config.guard_interval)
            try:
                await self.tick()
            except Exception:  # the guard must never take the server down with it
                log.exception("guard tick failed")

    async def tick(self) -> list[Finding]:
        self.samples.append(self.sampler.take())
        now = self.clock()
        findings = self._detect(now)
        self._announce(findings, now)
        if self.config.guard == "heal":
            for remedy in self.ladder.decide(findings, now):
                await self._apply(remedy)
        return findings

    def _detect(self, now: float) -> list[Finding]:
        samples = list(self.samples)
        findings = [f for detector in self.detectors for f in detector.observe(samples, now)]
        if self.engine.is_ready and not self.engine.is_healthy:
            findings.append(
                Finding(
                    "engine_stall",
                    "engine",
                    "critical",
                    "the engine has work but makes no progress (/health answers 503)",
                    {},
                )
            )
        return findings

    def _announce(self, findings: list[Finding], now: float) -> None:
        """Alert on findings that appeared; resolve those not seen for RESOLVE_AFTER seconds.

        A figure hovering at its threshold (a leak slope whose p-value crosses the level and
        back) would otherwise alert and resolve every few samples."""
        current = {(f.detector, f.process): f for f in findings}
        for key, finding in current.items():
            if key not in self.active:
                self.events.record(
                    "alert",
                    finding.detector,
                    finding.message,
                    process=finding.process,
                    severity=finding.severity,
                    details=dict(finding.details),
                )
            self.last_seen[key] = now
        still_active = dict(current)
        for key, finding in self.active.items():
            if key in current:
                continue
            if now - self.last_seen.get(key, now) < RESOLVE_AFTER:
                still_active[key] = finding
                continue
            self.events.record(
                "resolved", finding.detector, "no longer detected", process=finding.process
            )
            self.last_seen.pop(key, None)
        self.active = still_active

    async def _apply(self, remedy: Remedy) -> None:
        action = self._quietly(remedy.action, remedy.reason)
        if remedy.action == "recycle":
            # Loading a new worker takes seconds: keep sampling meanwhile.
            task = asyncio.create_task(action)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            await action

    async def _quietly(self, action: str, reason: str) -> None:
        with contextlib.suppress(Exception):  # reported; the ladder climbs on if need be
            await self.run_action(action, reason)

    async def run_action(self, action: str, reason: str) -> dict[str, Any]:
        """Run one remedy now; its event is recorded whether it worked or not."""
        started = time.monotonic()
        try:
            details = await self._act(action)
        except Exception as e:
            self.events.record(
                "action",
                action,
                f"failed ({reason}): {e}",
                severity="warning",
                details={"reason": reason},
                failed=True,
            )
            raise
        details = {"reason": reason, "seconds": time.monotonic() - started, **details}
        self.events.record("action", action, _describe(action, reason, details), details=details)
        return details

    async def _act(self, action: str) -> dict[str, Any]:
        if action == "trim":
            return await self.engine.command("trim")
        if action == "collect":
            engine = await self.engine.command("collect")
            api = collect_and_trim()
            return {f"engine_{k}": v for k, v in engine.items()} | {
                f"api_{k}": v for k, v in api.items()
            }
        if action == "recycle":
            return {"new_engine_pid": await self.engine.recycle()}
        raise ValueError(f"unknown action {action!r}")

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- reports ---------------------------------------------------------------------------

    def leak_estimates(self) -> dict[str, SlopeEstimate | None]:
        samples, now = list(self.samples), self.clock()
        return {p: d.estimate(samples, now) for p, d in self.leak_detectors.items()}

    def forecast(self) -> float | None:
        """Seconds until API + engine memory reaches the limit at the fitted growth."""
        if not self.samples:
            return None
        estimates = self.leak_estimates()
        slopes = [e.slope for e in estimates.values() if e is not None]
        if not slopes:
            return None
        combined = SlopeEstimate(sum(slopes), 0.0, 0.0, 0.0, 1.0, 0)
        return forecast_seconds(combined, self.samples[-1].memory_bytes, self.memory_limit)

    def report(self) -> dict[str, Any]:
        """GET /debug/guard."""
        leak = {
            process: _slope_json(estimate, self._bytes_per_request(process))
            for process, estimate in self.leak_estimates().items()
        }
        return {
            "mode": self.config.guard,
            "interval": self.config.guard_interval,
            "memory_limit_bytes": self.memory_limit,
            "forecast_seconds": self.forecast(),
            "leak": leak,
            "samples": [sample.to_json() for sample in self.samples],
        }

    def _bytes_per_request(self, process: str) -> float | None:
        for finding in self.active.values():
            if finding.detector == "memory_leak" and finding.process == process:
                value = finding.details.get("bytes_per_request")
                return float(value) if isinstance(value, int | float) else None
        return None


def _slope_json(estimate: SlopeEstimate | None, per_request: float | None) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {
        "slope_bytes_per_hour": estimate.slope * 3600,
        "low": estimate.low * 3600,
        "high": estimate.high * 3600,
        "p_value": estimate.p_value,
        "bytes_per_request": per_request,
        "num_points": estimate.num_points,
    }


def _describe(action: str, reason: str, details: dict[str, Any]) -> str:
    if action == "recycle":
        return f"recycled the engine worker (new pid {details['new_engine_pid']}) for {reason}"
    if action == "trim":
        return (
            f"trimmed {details.get('evicted_blocks', 0)} cached blocks, moved "
            f"{details.get('moved_blocks', 0)}, released "
            f"{len(details.get('released_segments', []))} segments for {reason}"
        )
    return f"ran gc.collect + malloc_trim in both processes for {reason}"


class GuardCollector(Collector):
    """Scrape-time gauges of the guard: the memory forecast, growth rates, active alerts."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def collect(self) -> Any:
        forecast = GaugeMetricFamily(
            "enduro_memory_forecast_seconds",
            "Seconds until API + engine memory reaches the limit at its fitted growth "
            "(+Inf when it is not growing).",
        )
        value = self.guard.forecast() if self.guard.samples else None
        forecast.add_metric([], value if value is not None else math.inf)
        yield forecast
        growth = GaugeMetricFamily(
            "enduro_memory_growth_bytes_per_hour",
            "Theil-Sen slope of each process's memory over the guard window.",
            labels=["process"],
        )
        for process, estimate in self.guard.leak_estimates().items():
            if estimate is not None:
                growth.add_metric([process], estimate.slope * 3600)
        yield growth
        active = GaugeMetricFamily(
            "enduro_guard_active_alerts", "Problems detected now, by detector.", labels=["detector"]
        )
        for (detector, _), _finding in self.guard.active.items():
            active.add_metric([detector], 1)
        yield active
        limit = GaugeMetricFamily(
            "enduro_memory_limit_bytes", "The memory limit the forecast runs against."
        )
        if self.guard.memory_limit is not None:
            limit.add_metric([], self.guard.memory_limit)
        yield limit
