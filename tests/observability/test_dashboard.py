"""/dashboard end to end: a real uvicorn server over a tiny model, its lifespan on so the sampler
runs, real streamed completions, then headless Chromium loads the page and waits until the four
charts have points. The screenshot goes to test-artifacts/dashboard.png."""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from enduro.observability.timeseries import DashboardSampler
from enduro.server.engine_client import EngineStats
from enduro.server.ipc import STEP_SECONDS_BUCKETS
from enduro.server.routes_dashboard import DASHBOARD_DIR
from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard.png"
KEY = "sk-dashboard"
AUTH = {"Authorization": f"Bearer {KEY}"}
INTERVAL = 0.2
MIN_POINTS = 10
NUM_CLIENTS = 2
MAX_TOKENS = 24
CHARTS_READY = """(minPoints) => {
  const charts = [...document.querySelectorAll(".chart")];
  return charts.length === 4
    && charts.every((c) => Number(c.dataset.points) >= minPoints && c.querySelector("canvas"))
    && !document.getElementById("latency-latest").textContent.includes("—");
}"""


def heartbeat(engine: InProcessEngineClient) -> EngineStats:
    """The pool as the engine process's heartbeat would report it (the in-process engine sends
    none, and the KV usage gauge reads the heartbeat); the dashboard uses no other field."""
    pool = engine.core.scheduler.kv_cache_manager.block_pool
    return EngineStats(
        time=time.monotonic(),
        num_steps=0,
        last_step_time=None,
        num_running=0,
        num_waiting=0,
        num_used_blocks=pool.num_used_blocks,
        num_cached_blocks=pool.num_cached_blocks,
        num_free_blocks=pool.num_free_blocks,
        num_blocks=pool.num_blocks,
        max_num_blocks=pool.max_num_blocks,
        num_segments=pool.num_segments,
        max_num_segments=pool.layout.max_num_segments,
        num_segments_grown=0,
        num_segments_released=0,
        num_compaction_moves=0,
        num_evictions=0,
        num_preemptions=0,
        num_prefix_queries=0,
        num_prefix_hits=0,
        num_prompt_tokens=0,
        num_prefill_tokens=0,
        num_generation_tokens=0,
        kv_cache_fragmentation=0.0,
        kv_cache_bytes=0,
        pool_violations=[],
        python_heap_bytes=None,
        malloc_allocated_bytes=None,
        malloc_held_bytes=None,
        num_allocator_purges=0,
        memory_bytes=None,
        step_seconds_counts=[0] * (len(STEP_SECONDS_BUCKETS) + 1),
        step_seconds_sum=0.0,
    )


@dataclass
class Server:
    url: str
    engine: InProcessEngineClient
    sampler: DashboardSampler


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[[str], Path]) -> Iterator[Server]:
    engine = tiny_engine(
        tiny_model_dir("llama"), step_delay=0.005, num_blocks=64, max_model_len=128
    )
    app = tiny_app(engine, api_key=KEY)
    # The app's own sampler, on the app's registry, but sampling every INTERVAL seconds.
    sampler = app.state.dashboard = DashboardSampler(app.state.dashboard.registry, INTERVAL)
    try:
        with serve(app, lifespan="on") as url:
            yield Server(url, engine, sampler)
        # The lifespan has ended: so has sampling.
        num_points = len(sampler.points)
        time.sleep(3 * INTERVAL)
        assert len(sampler.points) == num_points
    finally:
        engine.close()


def stream_completion(client: httpx.Client) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "stream": True}
    body |= {"ignore_eos": True, "temperature": 0.8}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for _ in response.iter_lines():
            pass


@contextlib.contextmanager
def traffic(server: Server) -> Iterator[None]:
    """NUM_CLIENTS clients streaming completions back to back, and the engine's heartbeat,
    until the block ends."""
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                stream_completion(client)

    def heartbeat_loop() -> None:
        while not stop.wait(INTERVAL / 4):
            server.engine.stats = heartbeat(server.engine)

    threads = [threading.Thread(target=client_loop) for _ in range(NUM_CLIENTS)]
    threads.append(threading.Thread(target=heartbeat_loop))
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


@pytest.mark.parametrize(
    "path", ["/dashboard", "/dashboard/data", "/dashboard/static/dashboard.js"]
)
def test_the_dashboard_needs_the_api_key(server: Server, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 401
    response = httpx.get(server.url + path, headers=AUTH)
    assert response.status_code == 200


def test_the_page_allows_its_own_origin_only(server: Server) -> None:
    response = httpx.get(server.url + "/dashboard", headers=AUTH)
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == "default-src 'self'"
    for name in ("index.html", "dashboard.js", "dashboard.css", "vendor/uPlot.min.css"):
        assert "://" not in (DASHBOARD_DIR / name).read_text(), name
    # uPlot names its home page in its banner comment, and nowhere else.
    vendored = (DASHBOARD_DIR / "vendor" / "uPlot.iife.min.js").read_text()
    assert vendored.count("://") == 1
    assert vendored.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")


def test_the_dashboard_routes_are_not_in_the_api_schema(server: Server) -> None:
    paths = httpx.get(server.url + "/openapi.json", headers=AUTH).json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]


def test_chromium_draws_four_charts_of_live_data(server: Server) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (Debian's chromium)")
    requested: list[str] = []
    errors: list[str] = []
    with traffic(server), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 760}, extra_http_headers=AUTH
            )
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = page.goto(server.url + "/dashboard")
            assert response is not None and response.status == 200
            page.wait_for_function(CHARTS_READY, arg=MIN_POINTS, timeout=30_000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            charts = page.eval_on_selector_all(
                ".chart", "els => els.map(e => [e.id, e.querySelectorAll('canvas').length])"
            )
        finally:
            browser.close()
    assert charts == [[f"{name}-chart", 1] for name in ("latency", "throughput", "memory", "kv")]
    assert errors == []
    assert requested and all(url.startswith(server.url + "/dashboard") for url in requested)
    busy = [p for p in server.sampler.points if p.tokens_per_second > 0]
    assert busy and all(p.memory_bytes for p in busy)
    assert any(p.ttft_p99 is not None and p.e2e_p99 is not None for p in busy)
    assert busy[-1].kv_usage is not None
