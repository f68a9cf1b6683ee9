"""The engine's step durations as a histogram: bucket counts and a sum, sent whole in every
heartbeat, so the API process exposes them at scrape time without a message per step."""

import bisect

from enduro.server.ipc import STEP_SECONDS_BUCKETS


class StepTimes:
    """Counts per bucket of STEP_SECONDS_BUCKETS (then +Inf), not cumulative, since start."""

    def __init__(self) -> None:
        self.counts = [0] * (len(STEP_SECONDS_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # A bucket holds durations up to and including its bound (Prometheus's `le`).
        self.counts[bisect.bisect_left(STEP_SECONDS_BUCKETS, seconds)] += 1
        self.sum += seconds
