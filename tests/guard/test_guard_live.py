"""The guard on a real `enduro serve` (tiny model, real engine process): a planted leak of
256 KiB per request under steady load is detected, the ladder climbs to a recycle of the
engine worker, no request fails, and the engine's memory returns near its baseline."""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.test_serve_process import ServerProcess

MIB = 1 << 20


class SteadyLoad:
    """`workers` threads sending short completions back to back; counts statuses."""

    def __init__(self, url: str, workers: int = 2) -> None:
        self.url = url
        self.statuses: Counter[int | str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        body = {"prompt": "hello there, how are you", "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    status: int | str = client.post(
                        f"{self.url}/v1/completions", json=body
                    ).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.statuses[status] += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture
def guarded_server(tiny_model_dir: Callable[[str], Path]) -> Iterator[ServerProcess]:
    server = ServerProcess(
        *("--model", str(tiny_model_dir("llama")), "--dtype", "float32"),
        *("--block-size", "4", "--num-blocks", "256", "--guard", "heal"),
        *("--guard-interval", "0.5", "--guard-warmup", "5", "--guard-window", "60"),
        *("--guard-cooldown", "4", "--recycle-interval", "60", "--enable-fault-injection"),
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def events(url: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(f"{url}/debug/events", timeout=10).json()["data"]
    return data


def engine_memory(url: str) -> int:
    samples = httpx.get(f"{url}/debug/guard", timeout=10).json()["samples"]
    values = [s["engine_memory_bytes"] for s in samples[-4:] if s["engine_memory_bytes"]]
    return int(sorted(values)[len(values) // 2])


def wait_for(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not seen within {timeout} s")


def test_a_planted_leak_is_found_within_two_minutes_and_a_recycle_heals_it(
    guarded_server: ServerProcess,
) -> None:
    url = guarded_server.url
    load = SteadyLoad(url)
    try:
        time.sleep(8)  # the guard's first samples, a steady baseline
        baseline = engine_memory(url)
        armed = httpx.post(
            f"{url}/debug/faults", json={"leak_bytes_per_request": 256 * 1024}, timeout=30
        )
        assert armed.status_code == 200
        armed_at = time.time()

        def leak_alert() -> dict[str, Any] | None:
            alerts = [e for e in events(url) if e["kind"] == "alert"]
            leaks = (e for e in alerts if e["name"] == "memory_leak" and e["process"] == "engine")
            return next(leaks, None)

        alert = wait_for(leak_alert, 120)
        assert alert["time"] - armed_at < 120
        assert 0.5 * 262144 < alert["details"]["bytes_per_request"] < 2 * 262144
        at_alert = engine_memory(url)

        def recycled() -> dict[str, Any] | None:
            actions = [e for e in events(url) if e["kind"] == "action"]
            return next((e for e in actions if e["name"] == "recycle"), None)

        recycle = wait_for(recycled, 90)
        # The fix ships. Until it does the new engine leaks too (faults survive a recycle,
        # as a defect in the code would), ≈20 MiB a second under this load: the reply
        # says how much, and that much stays.
        disarmed = httpx.post(f"{url}/debug/faults", json={}, timeout=30).json()
        time.sleep(6)
        healed = engine_memory(url)
    finally:
        load.stop()
    actions = [e["name"] for e in events(url) if e["kind"] == "action"]
    assert actions[0] == "faults" and actions.index("recycle") > actions.index("collect") > 0
    assert recycle["details"]["new_engine_pid"] in guarded_server.engine_pids()
    assert set(load.statuses) == {200} and load.statuses[200] > 100
    leaked_by_new_engine = disarmed["leaked_bytes"]
    assert leaked_by_new_engine % (256 * 1024) == 0
    assert healed < baseline + leaked_by_new_engine + 64 * MIB
    assert healed - leaked_by_new_engine < at_alert - 64 * MIB  # the old engine's leak is gone
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert samples[("enduro_guard_actions_total", (("action", "recycle"), ("outcome", "ok")))] == 1
    key = ("enduro_guard_alerts_total", (("detector", "memory_leak"), ("process", "engine")))
    assert samples[key] >= 1
