"""/debug/* over a real (in-process) engine: the pool map, memory growth, events, faults
refused unless enabled, a trim on request, and `enduro doctor` reading it all."""

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from enduro.config import GuardConfig
from enduro.guard.doctor import doctor_command
from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    engine = tiny_engine(
        tiny_model_dir("llama"), num_blocks=64, kv_segment_blocks=16, kv_cache_initial=1
    )
    try:
        yield engine
    finally:
        engine.close()


def test_the_pool_map_and_memory_growth(engine: InProcessEngineClient) -> None:
    app = tiny_app(engine, guard_config=GuardConfig(guard="observe", guard_interval=0.2))
    with serve(app, lifespan="on") as url:
        completion = httpx.post(
            f"{url}/v1/completions", json={"prompt": "hello " * 30, "max_tokens": 20}, timeout=30
        )
        assert completion.status_code == 200
        pool = httpx.get(f"{url}/debug/pool", timeout=10).json()
        memory = httpx.get(f"{url}/debug/memory?top=5", timeout=30).json()
        guard = httpx.get(f"{url}/debug/guard", timeout=10).json()
    assert (pool["block_size"], pool["segment_blocks"], pool["max_num_segments"]) == (4, 16, 4)
    assert [s["index"] for s in pool["segments"]] == [0, 1, 2, 3]
    allocated = [s for s in pool["segments"] if s["allocated"]]
    assert pool["num_segments"] == len(allocated)
    assert sum(s["num_used"] + s["num_cached"] + s["num_free"] for s in allocated) == (
        16 * len(allocated)
    )
    for process in ("api", "engine"):
        assert len(memory[process]["gc_types"]) == 5
        assert memory[process]["tracemalloc"] is None  # not started with --tracemalloc
    assert guard["mode"] == "observe" and guard["samples"]
    assert guard["samples"][-1]["kv_max_blocks"] is None  # the in-process engine: no heartbeat


def test_faults_are_refused_unless_enabled_and_trim_runs_on_request(
    engine: InProcessEngineClient,
) -> None:
    with serve(tiny_app(engine)) as url:
        refused = httpx.post(f"{url}/debug/faults", json={"fragment": True}, timeout=10)
        trimmed = httpx.post(f"{url}/debug/remediate", json={"action": "trim"}, timeout=30)
        recycle = httpx.post(f"{url}/debug/remediate", json={"action": "recycle"}, timeout=30)
        bad = httpx.post(f"{url}/debug/remediate", json={"action": "reboot"}, timeout=10)
        events = httpx.get(f"{url}/debug/events", timeout=10).json()
    assert refused.status_code == 404
    assert refused.json()["error"]["message"].startswith("fault injection is off")
    assert trimmed.status_code == 200
    assert set(trimmed.json()["details"]) >= {"evicted_blocks", "moved_blocks", "memory_after"}
    assert recycle.status_code == 503  # an in-process engine cannot be recycled
    assert bad.status_code == 400
    kinds = [(e["kind"], e["name"]) for e in events["data"]]
    assert kinds == [("action", "trim"), ("action", "recycle")]
    assert events["data"][1]["message"].startswith("failed (requested)")


def test_doctor_reports_on_a_live_server(engine: InProcessEngineClient, tmp_path: Path) -> None:
    import typer

    cli = typer.Typer()
    cli.command()(doctor_command)
    app = tiny_app(engine, guard_config=GuardConfig(guard="observe", guard_interval=0.2))
    with serve(app, lifespan="on") as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        time.sleep(0.6)  # a few guard samples
        result = CliRunner().invoke(cli, ["--url", url, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    for endpoint in ("guard", "events", "pool", "memory"):
        assert f"/debug/{endpoint}: not available" not in report
    assert "/debug/profile: not available" in report  # the in-process engine cannot profile
    for name in ("memory.png", "pool.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
