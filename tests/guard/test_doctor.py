"""`enduro doctor` against a fake server serving canned /debug JSON: exact report lines, valid
PNGs, the trace file, sections that are not available, and a server that is not there."""

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi import FastAPI, HTTPException, Request
from typer.testing import CliRunner, Result

from enduro.guard.doctor import doctor_command
from enduro.guard.doctor_report import TRACEMALLOC_OFF
from tests.server.fakes import free_port, serve

API_KEY = "secret"
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
MIB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRACE = {"traceEvents": [{"name": "step", "ph": "X", "ts": 0, "dur": 1200}]}
SUMMARY = "Name      Self CPU\n--------  --------\naten::mm  1.200ms\n"


def _sample(i: int) -> dict[str, Any]:
    # The last interval finished no requests: latency must come from the one before.
    idle = i == 29
    return {
        "time": T0 + 2 * i,
        "engine_pid": 4242,
        "api_memory_bytes": 100 * MIB + i * 64 * 1024,
        "engine_memory_bytes": 1536 * MIB + i * MIB,
        "ttft_p50": None if idle else 0.1 + i * 0.001,
        "ttft_p99": None if idle else 0.34,
        "tpot_p50": None if idle else 0.012,
        "tpot_p99": None if idle else 0.03,
        "step_seconds_mean": 0.01,
        "pool_violations": [],
    }


GUARD: dict[str, Any] = {
    "mode": "heal",
    "interval": 2.0,
    "memory_limit_bytes": 8 << 30,
    "forecast_seconds": 12_000.0,
    "leak": {
        "api": {
            "slope_bytes_per_hour": 12 * MIB,
            "low": 10 * MIB,
            "high": 14 * MIB,
            "p_value": 1.2e-5,
            "bytes_per_request": 1536.0,
            "num_points": 120,
        },
        "engine": None,
    },
    "samples": [_sample(i) for i in range(30)],
}
EVENTS: dict[str, Any] = {
    "object": "list",
    "data": [
        {"id": 1, "time": T0 + 20, "kind": "alert", "name": "memory_leak", "process": "engine",
         "severity": "warning", "message": "engine memory grows 12.0 MiB/h", "details": {}},
        {"id": 2, "time": T0 + 30, "kind": "action", "name": "trim_pool", "process": None,
         "severity": "info", "message": "freed 2 idle segments", "details": {"num_segments": 2}},
        {"id": 3, "time": T0 + 50, "kind": "resolved", "name": "memory_leak", "process": "engine",
         "severity": "info", "message": "engine memory is flat", "details": {}},
    ],
}  # fmt: skip
POOL: dict[str, Any] = {
    "block_size": 16,
    "segment_blocks": 64,
    "bytes_per_block": 32 * 1024,
    "num_segments": 2,
    "max_num_segments": 4,
    "fragmentation": 0.25,
    "num_used_blocks": 40,
    "num_cached_blocks": 30,
    "num_free_blocks": 58,
    "segments": [
        {"index": 0, "allocated": True, "num_used": 40, "num_cached": 10, "num_free": 14,
         "idle_seconds": None},
        {"index": 1, "allocated": True, "num_used": 0, "num_cached": 20, "num_free": 44,
         "idle_seconds": 95.0},
        {"index": 2, "allocated": False, "num_used": 0, "num_cached": 0, "num_free": 0,
         "idle_seconds": None},
        {"index": 3, "allocated": False, "num_used": 0, "num_cached": 0, "num_free": 0,
         "idle_seconds": None},
    ],
}  # fmt: skip
MEMORY: dict[str, dict[str, Any]] = {
    "api": {
        "gc_types": [
            {"type": "list", "count": 5000, "delta": -20},
            {"type": "dict", "count": 12000, "delta": 3400},
            {"type": "Request", "count": 300, "delta": 290},
        ],
        "tracemalloc": [
            {"where": "enduro/server/app.py:123", "size_bytes": 3 * MIB // 2,
             "size_diff": 1_258_291, "count_diff": 1200},
        ],
    },
    "engine": {"gc_types": [{"type": "tuple", "count": 10, "delta": 0}], "tracemalloc": None},
}  # fmt: skip
CANNED: dict[str, Any] = {
    "/version": {"version": "0.1.0"},
    "/debug/guard": GUARD,
    "/debug/events": EVENTS,
    "/debug/pool": POOL,
    "/debug/memory": MEMORY,
    "/debug/profile": True,  # answered from the request body
}


def fake_app(overrides: dict[str, Any] | None = None) -> FastAPI:
    """Serves CANNED with `overrides` applied; an override of None is a 404. /debug/* wants
    the API key, as the real server does."""
    canned = {**CANNED, **(overrides or {})}
    app = FastAPI()

    def answer(request: Request) -> Any:
        path = request.url.path
        authorized = request.headers.get("authorization") == f"Bearer {API_KEY}"
        if path.startswith("/debug/") and not authorized:
            raise HTTPException(401, "missing or invalid API key")
        if canned.get(path) is None:
            raise HTTPException(404)
        return canned[path]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "engine_restarts": 1}

    @app.get("/version")
    @app.get("/debug/guard")
    @app.get("/debug/events")
    @app.get("/debug/pool")
    @app.get("/debug/memory")
    def canned_json(request: Request) -> Any:
        return answer(request)

    @app.post("/debug/profile")
    async def profile(request: Request) -> dict[str, Any]:
        answer(request)  # the API key, and a 404 when overridden with None
        body = await request.json()
        trace = TRACE if body["trace"] else None
        return {"num_steps": body["num_steps"], "summary": SUMMARY, "trace": trace}

    return app


def run_doctor(*args: str, env: dict[str, str] | None = None) -> Result:
    app = typer.Typer()
    app.command()(doctor_command)
    return CliRunner().invoke(app, list(args), env={"ENDURO_API_KEY": "", **(env or {})})


def section(markdown: str, title: str) -> list[str]:
    """The lines of the `## title...` section, heading included, up to the next section."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
    return lines[start : end if end is None else end - 1]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which follows the 8-byte signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("doctor")
    with serve(fake_app()) as url:
        args = ["--url", url, "--out", str(out), "--api-key", API_KEY, "--trace"]
        result = run_doctor(*args, "--profile-steps", "4")
    assert result.exit_code == 0, result.output
    assert f"report written to {out / 'report.md'}" in result.output
    return out


@pytest.fixture(scope="module")
def report(report_dir: Path) -> str:
    return (report_dir / "report.md").read_text()


def test_header_names_version_guard_and_health(report: str) -> None:
    lines = report.splitlines()
    assert lines[0] == "# enduro doctor"
    assert lines[3] == "- Version: 0.1.0"
    assert lines[5] == "- Guard: heal, a sample every 2 s"
    assert lines[6] == "- Health: ok (engine restarts: 1)"


def test_memory_section_formats_slope_and_forecast(report: str) -> None:
    assert section(report, "Memory") == [
        "## Memory trend and forecast",
        "",
        "![memory](memory.png)",
        "",
        "- **api**: 101.8 MiB now; +12.0 MiB/h (CI +10.0 MiB/h to +14.0 MiB/h, p = 1.2e-05); "
        "1.5 KiB per request; 120 points",
        "- **engine**: 1.5 GiB now; no trend yet",
        "- **memory limit**: 8.0 GiB (api + engine), reached in 3 h 20 min",
    ]


def test_allocation_table_sorted_by_growth(report: str) -> None:
    lines = section(report, "Top Python allocation growth")
    assert "| enduro/server/app.py:123 | 1.5 MiB | +1.2 MiB | +1200 |" in lines
    assert lines[-3:] == ["### engine", "", "Not traced."]


def test_gc_types_top_row_is_the_largest_growth(report: str) -> None:
    lines = section(report, "Object growth by type")
    assert lines[2:9] == [
        "### api",
        "",
        "| Type | Count | Growth |",
        "| --- | ---: | ---: |",
        "| dict | 12000 | +3400 |",
        "| Request | 300 | +290 |",
        "| list | 5000 | -20 |",
    ]


def test_pool_section_lists_allocated_segments(report: str) -> None:
    assert section(report, "KV pool") == [
        "## KV pool",
        "",
        "- Segments: 2 of 4 allocated, 64 blocks of 16 tokens each (2.0 MiB per segment)",
        "- Blocks: 40 used, 30 cached, 58 free",
        "- Fragmentation: 0.25",
        "- Invariants: all hold",
        "",
        "![KV pool](pool.png)",
        "",
        "| Segment | Used | Cached | Free | Idle |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| 0 | 40 | 10 | 14 | - |",
        "| 1 | 0 | 20 | 44 | 1 min |",
    ]


def test_events_table(report: str) -> None:
    lines = section(report, "Recent alerts and actions")
    assert lines[4:] == [
        "| 2023-11-14 22:13:40 | alert | warning | memory_leak | engine | "
        "engine memory grows 12.0 MiB/h |",
        "| 2023-11-14 22:13:50 | action | info | trim_pool | - | freed 2 idle segments |",
        "| 2023-11-14 22:14:10 | resolved | info | memory_leak | engine | engine memory is flat |",
    ]


def test_profile_summary_and_trace_link(report: str, report_dir: Path) -> None:
    assert section(report, "Engine step profile") == [
        "## Engine step profile",
        "",
        "4 engine steps profiled.",
        "Chrome trace: [engine-trace.json](engine-trace.json) (open in ui.perfetto.dev).",
        "",
        "```text",
        *SUMMARY.rstrip().splitlines(),
        "```",
    ]
    assert json.loads((report_dir / "engine-trace.json").read_text()) == TRACE


def test_latency_uses_the_latest_interval_with_requests(report: str) -> None:
    assert section(report, "Latency") == [
        "## Latency (latest interval with finished requests)",
        "",
        "|  | p50 | p99 |",
        "| --- | ---: | ---: |",
        "| TTFT | 128.0 ms | 340.0 ms |",
        "| TPOT | 12.0 ms | 30.0 ms |",
        "",
        "Engine step: 10.0 ms mean.",
        "",
        "![latency](latency.png)",
    ]


@pytest.mark.parametrize(
    ("name", "size"),
    [("memory.png", (900, 450)), ("pool.png", (600, 400)), ("latency.png", (900, 550))],
)
def test_pngs_are_valid(report_dir: Path, name: str, size: tuple[int, int]) -> None:
    path = report_dir / name
    assert png_size(path) == size
    assert path.stat().st_size > 5_000  # more than a blank canvas


def test_missing_endpoints_are_not_available(tmp_path: Path) -> None:
    overrides = {"/debug/memory": None, "/debug/pool": None, "/debug/profile": None}
    with serve(fake_app(overrides)) as url:
        result = run_doctor("--url", url, "--out", str(tmp_path), "--api-key", API_KEY)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    assert section(report, "Top Python")[2:] == ["/debug/memory: not available."]
    assert section(report, "Object growth")[2:] == ["/debug/memory: not available."]
    assert section(report, "KV pool")[2:] == ["/debug/pool: not available."]
    assert section(report, "Engine step")[2:] == ["/debug/profile: not available."]
    assert not (tmp_path / "pool.png").exists()
    assert not (tmp_path / "engine-trace.json").exists()
    assert (tmp_path / "memory.png").exists()


def test_tracemalloc_off_says_how_to_turn_it_on(tmp_path: Path) -> None:
    untraced = {process: {**MEMORY[process], "tracemalloc": None} for process in MEMORY}
    with serve(fake_app({"/debug/memory": untraced})) as url:
        # The key from the environment, as `enduro serve` reads it.
        env = {"ENDURO_API_KEY": API_KEY}
        result = run_doctor("--url", url, "--out", str(tmp_path), env=env)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    assert section(report, "Top Python")[2:] == [TRACEMALLOC_OFF]


def test_missing_api_key_fails_clearly(tmp_path: Path) -> None:
    with serve(fake_app()) as url:
        result = run_doctor("--url", url, "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "pass --api-key or set ENDURO_API_KEY" in result.output
    assert not (tmp_path / "report.md").exists()


def test_unreachable_server_exits_non_zero(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_doctor("--url", url, "--out", str(tmp_path / "report"))
    assert result.exit_code == 1
    assert f"cannot reach the server at {url}" in result.output
    assert not (tmp_path / "report").exists()
