"""Prometheus metrics: known traffic in, exact samples out, `promtool check metrics` clean.

Every test builds a fresh CollectorRegistry and reads values back from it exactly; the engine
(a tiny model stepping in a thread) is shared by the module.
"""

import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from enduro.config import ServerConfig
from enduro.observability.engine_collector import EngineCollector
from enduro.observability.process_memory import anon_memory_bytes
from enduro.observability.request_record import ERROR_REASONS
from enduro.server.ipc import STEP_SECONDS_BUCKETS, EngineStats
from tests.server.fakes import InProcessEngineClient, free_port, serve, tiny_app, tiny_engine
from tests.server.test_serve_process import ServerProcess, wait_until

PROMTOOL = "/usr/bin/promtool"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time"]
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]
GREEDY = {"temperature": 0, "ignore_eos": True}
Labels = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    engine = tiny_engine(tiny_model_dir("llama"))
    yield engine
    engine.close()


def samples(registry: CollectorRegistry, name: str) -> dict[Labels, float]:
    """Every sample called `name`, by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def promtool_problems(exposition: str) -> str:
    """What `promtool check metrics` says about an exposition ('' when it is clean)."""
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition.encode(), capture_output=True
    )
    problems = (checked.stdout + checked.stderr).decode()
    return problems if problems or checked.returncode == 0 else f"exit {checked.returncode}"


def last_usage(lines: list[str]) -> dict[str, int]:
    chunks = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    usage: dict[str, int] = chunks[-1]["usage"]
    return usage


def test_counters_equal_the_traffic_sent(engine: InProcessEngineClient) -> None:
    registry = CollectorRegistry()
    with serve(tiny_app(engine, registry=registry)) as url, httpx.Client(base_url=url) as client:
        usages = []
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 5, **GREEDY}
            usages.append(client.post("/v1/completions", json=body, timeout=60).json()["usage"])
        chat = {"messages": MESSAGES, "max_tokens": 4, **GREEDY}
        usages.append(client.post("/v1/chat/completions", json=chat, timeout=60).json()["usage"])
        bad = client.post("/v1/completions", json={"prompt": "x", "temperature": 3})
        assert bad.status_code == 400
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        stream = {"prompt": PROMPTS[0], "max_tokens": 5, "stream": True, **GREEDY}
        stream["stream_options"] = {"include_usage": True}
        with client.stream("POST", "/v1/completions", json=stream, timeout=60) as response:
            usages.append(last_usage(list(response.iter_lines())))
        assert client.get("/v1/nothing-here").status_code == 404
        exposition = client.get("/metrics").text

    assert samples(registry, "enduro_requests_total") == {
        (("endpoint", "/v1/completions"), ("status", "200")): 4,
        (("endpoint", "/v1/chat/completions"), ("status", "200")): 1,
        (("endpoint", "/v1/completions"), ("status", "400")): 1,
        (("endpoint", "/v1/chat/completions"), ("status", "400")): 1,
        (("endpoint", "other"), ("status", "404")): 1,
        (("endpoint", "/metrics"), ("status", "200")): 1,  # the scrape, counted once it ended
    }
    errors = {(("reason", reason),): 0.0 for reason in ERROR_REASONS}
    errors |= {(("reason", "validation"),): 2, (("reason", "not_found"),): 1}
    assert samples(registry, "enduro_request_errors_total") == errors
    assert [u["completion_tokens"] for u in usages] == [5, 5, 5, 4, 5]
    num_prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert value(registry, "enduro_prompt_tokens_total") == num_prompt_tokens
    assert value(registry, "enduro_generation_tokens_total") == 24
    # Five requests reached the engine; each choice of n tokens has n - 1 gaps.
    for histogram in ("time_to_first_token", "request_duration", "request_queue"):
        assert value(registry, f"enduro_{histogram}_seconds_count") == 5
    assert value(registry, "enduro_inter_token_latency_seconds_count") == 4 * 4 + 3
    ttft = value(registry, "enduro_time_to_first_token_seconds_sum")
    duration = value(registry, "enduro_request_duration_seconds_sum")
    assert ttft is not None and duration is not None and 0 < ttft < duration
    # The scrape itself was served from the same registry, and promtool finds nothing wrong.
    assert "enduro_generation_tokens_total 24.0" in exposition
    assert promtool_problems(exposition) == ""


def test_standard_collectors_and_build_info_are_in_the_injected_registry(
    engine: InProcessEngineClient,
) -> None:
    registry = CollectorRegistry()
    tiny_app(engine, registry=registry)
    dtype = engine.model_info.dtype
    assert samples(registry, "enduro_build_info") == {
        (
            ("block_size", "4"),
            ("dtype", dtype),
            ("max_model_len", "1024"),
            ("model", "tiny"),
            ("num_blocks", "256"),
            ("version", "0.1.0"),
        ): 1.0
    }
    for name in ("process_resident_memory_bytes", "python_gc_collections_total"):
        assert samples(registry, name), name
    # No engine process and no heartbeat: only the API's own memory is known.
    memory = samples(registry, "enduro_process_memory_bytes")
    assert list(memory) == [(("process", "api"),)] and memory[(("process", "api"),)] > 0
    assert list(samples(registry, "enduro_python_heap_bytes")) == [(("process", "api"),)]
    assert samples(registry, "enduro_kv_cache_blocks") == {}
    assert value(registry, "enduro_engine_restarts_total") == 0


def test_error_reasons_follow_the_failure(engine: InProcessEngineClient) -> None:
    registry = CollectorRegistry()
    app = tiny_app(engine, registry=registry, api_key="sk-key", max_body_bytes=2048)
    key = {"Authorization": "Bearer sk-key"}
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        huge = {"prompt": "x" * 4096}
        assert client.post("/v1/completions", json=huge, headers=key).status_code == 413
        wrong_model = {"prompt": "x", "model": "gpt-9"}
        assert client.post("/v1/completions", json=wrong_model, headers=key).status_code == 404
        engine.die_after_outputs = 2  # the engine "dies" under this request
        body = {"prompt": "Hello", "max_tokens": 8, **GREEDY}
        assert client.post("/v1/completions", json=body, headers=key).status_code == 503
    errors = samples(registry, "enduro_request_errors_total")
    assert {labels[0][1]: count for labels, count in errors.items() if count} == {
        "unauthorized": 1,
        "too_large": 1,
        "not_found": 1,
        "engine": 1,
    }
    # Answered before routing (401, 413), still labelled with the route they were for.
    assert samples(registry, "enduro_requests_total") == {
        (("endpoint", "/v1/completions"), ("status", status)): 1.0
        for status in ("401", "413", "404", "503")
    }


def test_a_client_that_leaves_mid_stream_counts_as_aborted(
    engine: InProcessEngineClient,
) -> None:
    registry = CollectorRegistry()
    with serve(tiny_app(engine, registry=registry)) as url, httpx.Client(base_url=url) as client:
        body = {"prompt": PROMPTS[1], "max_tokens": 500, "stream": True, **GREEDY}
        with client.stream("POST", "/v1/completions", json=body, timeout=60) as response:
            next(response.iter_lines())  # one chunk, then hang up
        aborted = {"reason": "aborted"}
        assert wait_until(
            lambda: value(registry, "enduro_request_errors_total", **aborted) == 1, 10
        )
    requests = {"endpoint": "/v1/completions", "status": "200"}
    assert value(registry, "enduro_requests_total", **requests) == 1
    assert value(registry, "enduro_request_duration_seconds_count") == 1
    generated = value(registry, "enduro_generation_tokens_total")
    assert generated is not None and 1 <= generated < 500
    assert wait_until(lambda: engine.num_used_blocks == 0, 10)


def heartbeat(**changes: Any) -> EngineStats:
    fields: dict[str, Any] = {
        "time": 100.0,
        "num_steps": 40,
        "last_step_time": 99.5,
        "num_running": 3,
        "num_waiting": 2,
        "num_used_blocks": 30,
        "num_cached_blocks": 10,
        "num_free_blocks": 88,
        "num_blocks": 128,
        "max_num_blocks": 256,
        "num_segments": 4,
        "max_num_segments": 8,
        "num_segments_grown": 6,
        "num_segments_released": 2,
        "num_compaction_moves": 17,
        "num_evictions": 5,
        "num_preemptions": 4,
        "num_prefix_queries": 640,
        "num_prefix_hits": 256,
        "num_prompt_tokens": 640,
        "num_prefill_tokens": 384,
        "num_generation_tokens": 77,
        "kv_cache_fragmentation": 0.25,
        "kv_cache_bytes": 128 * 4096,
        "pool_violations": [],
        "python_heap_bytes": 5_000_000,
        "malloc_allocated_bytes": 300_000_000,
        "malloc_held_bytes": 20_000_000,
        "num_allocator_purges": 9,
        "memory_bytes": 900_000_000,
        "step_seconds_counts": [0, 10, 20, *[0] * 14, 10],
        "step_seconds_sum": 123.5,
    }
    return EngineStats(**(fields | changes))


class EngineStub:
    def __init__(self, stats: EngineStats | None, pid: int | None, num_restarts: int) -> None:
        self.stats, self.pid, self.num_restarts = stats, pid, num_restarts


def test_engine_gauges_and_counters_come_from_the_heartbeat() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])  # an "engine" whose memory holds still
    try:
        assert wait_until(lambda: _asleep(sleeper.pid), 10)
        registry = CollectorRegistry()
        registry.register(EngineCollector(EngineStub(heartbeat(), sleeper.pid, 2)))
        exposition = _exposition(registry)
        expected_memory = anon_memory_bytes(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    read = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
        if not s.name.startswith("enduro_engine_step") and "process" not in s.labels
    }
    assert read == {
        ("enduro_requests_running", ()): 3,
        ("enduro_requests_waiting", ()): 2,
        ("enduro_preemptions_total", ()): 4,
        ("enduro_prefix_cache_queries_tokens_total", ()): 640,
        ("enduro_prefix_cache_hits_tokens_total", ()): 256,
        ("enduro_kv_cache_blocks", (("state", "used"),)): 30,
        ("enduro_kv_cache_blocks", (("state", "cached"),)): 10,
        ("enduro_kv_cache_blocks", (("state", "free"),)): 88,
        ("enduro_kv_cache_usage_ratio", ()): 30 / 256,
        ("enduro_kv_cache_max_blocks", ()): 256,
        ("enduro_kv_cache_segments", (("state", "allocated"),)): 4,
        ("enduro_kv_cache_segments", (("state", "max"),)): 8,
        ("enduro_kv_cache_segments_grown_total", ()): 6,
        ("enduro_kv_cache_segments_released_total", ()): 2,
        ("enduro_kv_cache_compaction_moves_total", ()): 17,
        ("enduro_prefix_cache_evictions_total", ()): 5,
        ("enduro_kv_cache_invariant_violations", ()): 0,
        ("enduro_kv_cache_fragmentation_ratio", ()): 0.25,
        ("enduro_kv_cache_bytes", ()): 128 * 4096,
        ("enduro_allocator_purges_total", ()): 9,
        ("enduro_engine_prefill_tokens_total", ()): 384,
        ("enduro_engine_decode_tokens_total", ()): 77,
        ("enduro_engine_restarts_total", ()): 2,
    }
    step = samples_of(families["enduro_engine_step_seconds"])
    bounds = [*map(str, STEP_SECONDS_BUCKETS), "+Inf"]
    cumulative = [0, 10, *[30] * 15, 40]
    expected: dict[tuple[str, str | None], float] = {
        ("enduro_engine_step_seconds_bucket", le): n
        for le, n in zip(bounds, cumulative, strict=True)
    }
    expected[("enduro_engine_step_seconds_count", None)] = 40
    expected[("enduro_engine_step_seconds_sum", None)] = 123.5
    assert step == expected
    memory = samples_of(families["enduro_process_memory_bytes"], "process")
    assert expected_memory is not None and memory[("enduro_process_memory_bytes", "engine")] == (
        expected_memory
    )
    heap = samples_of(families["enduro_python_heap_bytes"], "process")
    assert heap[("enduro_python_heap_bytes", "engine")] == 5_000_000
    malloc = {
        (s.labels["process"], s.labels["state"]): s.value
        for s in families["enduro_malloc_bytes"].samples
    }
    assert malloc[("engine", "allocated")] == 300_000_000
    assert malloc[("engine", "held")] == 20_000_000
    # The API process reads its own allocator (glibc: it is never preloaded).
    assert malloc[("api", "allocated")] > 0 and ("api", "held") in malloc
    assert promtool_problems(exposition) == ""


def _asleep(pid: int) -> bool:
    """Exec'd and sleeping: its memory no longer changes."""
    process = psutil.Process(pid)
    return process.cmdline() == ["sleep", "60"] and process.status() == psutil.STATUS_SLEEPING


def samples_of(family: Any, label: str = "le") -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get(label)): s.value for s in family.samples}


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_without_a_heartbeat_engine_families_are_empty_and_promtool_is_content() -> None:
    registry = CollectorRegistry()
    registry.register(EngineCollector(EngineStub(None, None, 0)))
    exposition = _exposition(registry)
    assert value(registry, "enduro_requests_running") is None
    assert value(registry, "enduro_engine_restarts_total") == 0
    assert promtool_problems(exposition) == ""


def test_metrics_port_must_be_its_own() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(port=8000, metrics_port=8000)
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(metrics_port=70000)


def scrape(url: str) -> dict[tuple[str, Labels], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_serve_exposes_live_engine_gauges_on_the_metrics_port(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    metrics_port = free_port()
    server = ServerProcess(
        *("--model", str(tiny_model_dir("llama")), "--dtype", "float32"),
        *("--block-size", "4", "--num-blocks", "256", "--metrics-port", str(metrics_port)),
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        server.wait_ready()
        body = {"prompt": "Hello world", "max_tokens": 400, "stream": True, **GREEDY}
        done = threading.Event()

        def long_request() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    pass
            done.set()

        threading.Thread(target=long_request, daemon=True).start()

        def busy() -> bool:
            now = scrape(metrics_url)
            used = now.get(("enduro_kv_cache_blocks", (("state", "used"),)), 0)
            return used > 0 and now.get(("enduro_requests_running", ())) == 1

        assert wait_until(busy, 60), "the gauges never showed the running request"
        assert done.wait(120)
        assert wait_until(lambda: scrape(metrics_url)[("enduro_requests_running", ())] == 0, 10)
        final = scrape(metrics_url)
        assert final[("enduro_kv_cache_blocks", (("state", "used"),))] == 0
        assert final[("enduro_engine_step_seconds_count", ())] >= 400
        assert final[("enduro_generation_tokens_total", ())] == 400
        for process in ("api", "engine"):
            labels = (("process", process),)
            assert final[("enduro_process_memory_bytes", labels)] > 0
            assert final[("enduro_python_heap_bytes", labels)] > 0
            allocated = (("process", process), ("state", "allocated"))
            assert final[("enduro_malloc_bytes", allocated)] > 0
        exposition = httpx.get(metrics_url).text
        assert promtool_problems(exposition) == ""
        # Only /metrics there; the API port serves it too.
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models").status_code == 404
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert not _listening(metrics_port)


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
    except httpx.TransportError:
        return False
    return True
