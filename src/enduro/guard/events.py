"""Every alert and action of the guard, three ways: a metric, a JSON log line, and an entry
in the ring buffer GET /debug/events serves."""

import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

MAX_EVENTS = 1000
EVENT_KINDS = ("alert", "resolved", "action")

log = logging.getLogger("enduro.guard")


@dataclass(frozen=True)
class GuardEvent:
    id: int
    time: float  # unix seconds
    kind: str  # alert (a problem appeared), resolved (it went away), action (a remedy ran)
    name: str  # the detector, or the action
    process: str | None
    severity: str  # info, warning, critical
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    def __init__(self, registry: CollectorRegistry, clock: Any = time.time) -> None:
        self.clock = clock
        self._ids = itertools.count(1)
        self.events: deque[GuardEvent] = deque(maxlen=MAX_EVENTS)
        self.alerts = Counter(
            "enduro_guard_alerts",
            "Problems the guard detected, by detector and process.",
            ["detector", "process"],
            registry=registry,
        )
        self.actions = Counter(
            "enduro_guard_actions",
            "Remedies the guard ran, by action and outcome (ok, failed).",
            ["action", "outcome"],
            registry=registry,
        )

    def record(
        self,
        kind: str,
        name: str,
        message: str,
        *,
        process: str | None = None,
        severity: str = "info",
        details: dict[str, Any] | None = None,
        failed: bool = False,
    ) -> GuardEvent:
        event = GuardEvent(
            next(self._ids), self.clock(), kind, name, process, severity, message, details or {}
        )
        self.events.append(event)
        if kind == "alert":
            self.alerts.labels(name, process or "").inc()
        elif kind == "action":
            self.actions.labels(name, "failed" if failed else "ok").inc()
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        log.log(
            level,
            "guard %s %s: %s",
            kind,
            name,
            message,
            extra={
                "event": f"guard_{kind}",
                "guard_name": name,
                "guard_process": process,
                **_flat(details),
            },
        )
        return event

    def recent(self, limit: int = MAX_EVENTS) -> list[GuardEvent]:
        return list(self.events)[-limit:]


def _flat(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as log fields, prefixed so they never clash with the record's own."""
    return {f"detail_{key}": value for key, value in (details or {}).items()}
