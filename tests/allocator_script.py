"""Running a snippet in a fresh interpreter on a given allocator, for memory tests: a fresh
process has no other test's allocations in its figures."""

import json
import subprocess
import sys
from typing import Any

from enduro.server.allocator import engine_environment


def run_json_script(
    script: str,
    allocator: str,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> Any:
    """Runs `python -c script args...` with the engine's environment for `allocator` (plus
    `env`) and returns the JSON it printed."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**engine_environment(allocator), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(result.stdout)
