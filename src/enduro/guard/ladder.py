"""The remediation ladder: which action the guard takes, and when, for the problems present.

Pure state machine: findings and the time go in, remedies come out; the caller runs them
through the engine's command interface. Each problem climbs its own ladder, cheapest rung
first; the rate limits are shared, because the actions act on the whole server.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from enduro.config import GuardConfig
from enduro.guard.detectors import CPU_CONTENTION, Finding

TRIM = "trim"
"""Trim the prefix cache, compact the KV pool and release idle segments."""
COLLECT = "collect"
"""gc.collect() and malloc_trim(0) in both processes."""
RECYCLE = "recycle"
"""Replace the engine worker with a fresh one."""

TRIM_INTERVAL = 10.0
COLLECT_INTERVAL = 30.0


@dataclass(frozen=True)
class Remedy:
    action: str
    """trim, collect or recycle."""
    reason: str
    """The problem it is for: the finding's detector, plus ":process" when it has one."""


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[str, ...]
    repeat_top: bool = True
    """Whether the top rung is taken again (after the cooldown) while the problem persists."""


ENGINE_LADDER = Ladder((TRIM, COLLECT, RECYCLE))
# Trimming the engine's cache or recycling the engine cannot shrink the API process, and
# collecting again will not either.
API_LEAK_LADDER = Ladder((COLLECT,), repeat_top=False)
RECYCLE_LADDER = Ladder((RECYCLE,))
LADDERS = {
    "memory_leak": ENGINE_LADDER,
    "latency_drift": ENGINE_LADDER,
    "pool_invariant": RECYCLE_LADDER,
    "engine_stall": RECYCLE_LADDER,
}


def ladder_for(finding: Finding) -> Ladder | None:
    """The ladder a problem climbs; None for problems the guard only reports: detectors it
    has no remedy for, and a latency drift caused by CPU contention from outside the server
    (trimming the cache or recycling the worker would only make every request slower)."""
    if finding.detector == "memory_leak" and finding.process == "api":
        return API_LEAK_LADDER
    if finding.details.get("cause") == CPU_CONTENTION:
        return None
    return LADDERS.get(finding.detector)


def problem_key(finding: Finding) -> str:
    if finding.process is None:
        return finding.detector
    return f"{finding.detector}:{finding.process}"


@dataclass
class Climb:
    """One problem's position on its ladder."""

    next_rung: int = 0
    last_action_time: float | None = None


class RemediationLadder:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.climbs: dict[str, Climb] = {}
        """Problems present at the last decide(), by problem_key."""
        self.last_run: dict[str, float] = {}
        """When each action was last returned, for the shared rate limits."""

    def decide(self, findings: Sequence[Finding], now: float) -> list[Remedy]:
        """The actions to take now; each action appears once and serves every problem that
        wanted it (they all move up a rung)."""
        present = {problem_key(f): f for f in findings}
        self.climbs = {key: self.climbs.get(key, Climb()) for key in present}
        remedies: list[Remedy] = []
        for key, finding in present.items():
            ladder = ladder_for(finding)
            if ladder is not None:
                self._climb(key, ladder, now, remedies)
        return remedies

    def _climb(self, key: str, ladder: Ladder, now: float, remedies: list[Remedy]) -> None:
        """Add this problem's due action to remedies, unless another problem already did."""
        climb = self.climbs[key]
        action = self._due_action(ladder, climb, now)
        if action is None:
            return
        if all(r.action != action for r in remedies):
            if not self._allowed(action, now):
                return  # the problem keeps its rung and retries at a later decide()
            self.last_run[action] = now
            remedies.append(Remedy(action, key))
        self._advance(ladder, climb, now)

    def _due_action(self, ladder: Ladder, climb: Climb, now: float) -> str | None:
        if climb.next_rung >= len(ladder.rungs):
            return None
        last = climb.last_action_time
        if last is not None and now - last < self.config.guard_cooldown:
            return None
        return ladder.rungs[climb.next_rung]

    def _advance(self, ladder: Ladder, climb: Climb, now: float) -> None:
        climb.last_action_time = now
        climb.next_rung += 1
        if ladder.repeat_top:
            climb.next_rung = min(climb.next_rung, len(ladder.rungs) - 1)

    def _allowed(self, action: str, now: float) -> bool:
        last = self.last_run.get(action)
        return last is None or now - last >= self._min_interval(action)

    def _min_interval(self, action: str) -> float:
        if action == TRIM:
            return TRIM_INTERVAL
        if action == COLLECT:
            return COLLECT_INTERVAL
        return self.config.recycle_interval
