"""Profile the next few engine steps with the torch profiler, for `enduro doctor`.

When the engine is idle there is nothing to profile, so the loop adds a few short greedy
requests (ids under PROFILE_REQUEST_PREFIX, which no client waits for) to make steps.
"""

import json
import os
import tempfile
from typing import Any

import torch

PROFILE_REQUEST_PREFIX = "__profile__"
MAX_PROFILE_STEPS = 64


class StepProfiler:
    def __init__(self, command_id: int, num_steps: int, trace: bool) -> None:
        self.command_id = command_id
        self.num_steps = max(1, min(num_steps, MAX_PROFILE_STEPS))
        self.trace = trace
        self.steps_done = 0
        self._profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False
        )
        self._profile.__enter__()

    def after_step(self) -> bool:
        """Count a step; True once enough were recorded."""
        self.steps_done += 1
        return self.steps_done >= self.num_steps

    def finish(self) -> dict[str, Any]:
        self._profile.__exit__(None, None, None)
        summary = self._profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        return {"num_steps": self.steps_done, "summary": summary, "trace": self._chrome_trace()}

    def _chrome_trace(self) -> Any:
        if not self.trace:
            return None
        handle, path = tempfile.mkstemp(suffix=".json", prefix="enduro-trace-")
        os.close(handle)
        try:
            self._profile.export_chrome_trace(path)
            with open(path) as file:
                return json.load(file)
        finally:
            os.unlink(path)
