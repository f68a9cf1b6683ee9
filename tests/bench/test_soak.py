"""The soak against a fake OpenAI-like server: real HTTP, real SSE, scripted figures."""

import asyncio
import csv
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from typer.testing import CliRunner

from enduro.bench.soak import (
    SoakOptions,
    interval_hit_rate,
    interval_steps,
    parse_duration,
    read_metrics,
    run_soak,
    soak_command,
)
from enduro.bench.soak_report import MIB, PLOTS
from enduro.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server.fakes import serve

METRICS = """\
# TYPE enduro_process_memory_bytes gauge
enduro_process_memory_bytes{process="api"} 104857600.0
enduro_process_memory_bytes{process="engine"} 209715200.0
# TYPE enduro_malloc_bytes gauge
enduro_malloc_bytes{process="api",state="allocated"} 52428800.0
enduro_malloc_bytes{process="engine",state="allocated"} 157286400.0
enduro_malloc_bytes{process="engine",state="held"} 31457280.0
# TYPE enduro_kv_cache_usage_ratio gauge
enduro_kv_cache_usage_ratio 0.25
# TYPE enduro_kv_cache_fragmentation_ratio gauge
enduro_kv_cache_fragmentation_ratio 0.0
# TYPE enduro_engine_restarts counter
enduro_engine_restarts_total 0.0
# TYPE enduro_requests_running gauge
enduro_requests_running 2.0
"""
# The fake's prefix-cache counters grow by 100 looked-up and 75 served tokens per scrape; its
# engine makes 10 steps of 50 ms per scrape, 8 decode and 20 prefill tokens each.
PREFIX_COUNTERS = """\
# TYPE enduro_prefix_cache_queries_tokens counter
enduro_prefix_cache_queries_tokens_total {queries}
# TYPE enduro_prefix_cache_hits_tokens counter
enduro_prefix_cache_hits_tokens_total {hits}
# TYPE enduro_engine_step_seconds histogram
enduro_engine_step_seconds_bucket{{le="+Inf"}} {steps}
enduro_engine_step_seconds_count {steps}
enduro_engine_step_seconds_sum {step_seconds}
# TYPE enduro_engine_decode_tokens counter
enduro_engine_decode_tokens_total {decode}
# TYPE enduro_engine_prefill_tokens counter
enduro_engine_prefill_tokens_total {prefill}
"""


def counters(n: int) -> str:
    return PREFIX_COUNTERS.format(
        queries=100 * n,
        hits=75 * n,
        steps=10 * n,
        step_seconds=0.5 * n,
        decode=80 * n,
        prefill=200 * n,
    )


MAX_REPLY_TOKENS = 6  # the fake's replies stay short whatever max_tokens says: fast tests


def sse(chunk: object) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def fake_server(fail_every: int | None = None, alert: bool = False) -> FastAPI:
    """Completions and chat (validated by the real server's schema: 400 when invalid), SSE or
    JSON, 2 ms per token; every `fail_every`-th valid request gets a 500. /metrics holds a
    few enduro series (no KV bytes), /debug/events an old event, an action, an alert if asked."""
    app = FastAPI()
    started = time.time()
    count = {"valid": 0}

    async def tokens(body: Any, chat: bool) -> AsyncIterator[str]:
        num_tokens = min(body.max_tokens or 16, MAX_REPLY_TOKENS)
        for i in range(num_tokens):
            await asyncio.sleep(0.002)
            delta = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            yield sse({"choices": [{"index": 0, **delta}]})
        if body.stream_options and body.stream_options.include_usage:
            usage = {"prompt_tokens": 10, "completion_tokens": num_tokens}
            yield sse({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    async def generate(request: Request, chat: bool) -> Response:
        schema = ChatCompletionRequest if chat else CompletionRequest
        try:
            body = schema.model_validate_json(await request.body())
        except ValidationError as error:
            return JSONResponse({"error": {"message": str(error)[:200]}}, 400)
        assert body.model == "fake-model"
        count["valid"] += 1
        if fail_every is not None and count["valid"] % fail_every == 0:
            return JSONResponse({"error": {"message": "scripted failure"}}, 500)
        if body.stream:
            return StreamingResponse(tokens(body, chat), media_type="text/event-stream")
        num_tokens = min(body.max_tokens or 16, MAX_REPLY_TOKENS)
        await asyncio.sleep(0.002 * num_tokens)
        text = "".join(f"t{i} " for i in range(num_tokens))
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return JSONResponse({"choices": [choice], "usage": {"completion_tokens": num_tokens}})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    app.get("/ready")(lambda: {"status": "ok"})
    app.get("/v1/models")(lambda: {"data": [{"id": "fake-model", "max_model_len": 32768}]})
    scrapes = {"count": 0}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        scrapes["count"] += 1
        n = scrapes["count"]
        return PlainTextResponse(METRICS + counters(n))

    @app.get("/debug/events")
    def events() -> dict[str, Any]:
        data = [
            {"id": 1, "time": 1.0, "kind": "alert", "name": "old", "severity": "warn"},
            {"id": 2, "time": started + 1, "kind": "action", "name": "gc", "severity": "info"},
        ]
        if alert:
            data.append({"id": 3, "time": time.time(), "kind": "alert", "name": "ttft_drift"})
        return {"object": "list", "data": data}

    return app


@pytest.mark.parametrize(
    ("text", "seconds"), [("180", 180.0), ("90s", 90.0), ("3m", 180.0), ("1h", 3600.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "soon", "-3m", "0"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_read_metrics_takes_the_series_it_knows() -> None:
    assert read_metrics(METRICS + counters(4)) == {
        "api_memory_bytes": 100 * MIB,
        "engine_memory_bytes": 200 * MIB,
        "engine_malloc_allocated_bytes": 150 * MIB,
        "engine_malloc_held_bytes": 30 * MIB,
        "kv_usage": 0.25,
        "kv_fragmentation": 0.0,
        "engine_restarts": 0.0,
        "prefix_queries": 400.0,
        "prefix_hits": 300.0,
        "steps": 40.0,
        "step_seconds": 2.0,
        "decode_tokens": 320.0,
        "prefill_tokens": 800.0,
    }


def test_interval_hit_rate() -> None:
    assert interval_hit_rate((400.0, 300.0), (600.0, 350.0)) == 0.25
    assert interval_hit_rate(None, (600.0, 350.0)) is None  # the first reading
    assert interval_hit_rate((400.0, 300.0), (400.0, 300.0)) is None  # no lookups
    assert interval_hit_rate((400.0, 300.0), (50.0, 10.0)) is None  # a new engine worker


def test_interval_steps() -> None:
    last = {"steps": 100.0, "step_seconds": 8.0, "decode_tokens": 1000.0, "prefill_tokens": 0.0}
    now = {"steps": 140.0, "step_seconds": 10.0, "decode_tokens": 1320.0, "prefill_tokens": 512.0}
    assert interval_steps(last, now) == {
        "step_ms": 50.0,
        "decode_tokens_per_step": 8.0,
        "prefill_tokens_per_step": 12.8,
    }
    assert interval_steps({}, now) == {}  # the first reading
    assert interval_steps(last, {**now, "steps": 100.0}) == {}  # no step in between
    assert interval_steps(last, {k: v / 10 for k, v in now.items()}) == {}  # a new worker
    assert interval_steps(last, {k: v for k, v in now.items() if k != "prefill_tokens"}) == {}


@pytest.mark.asyncio
async def test_a_mixed_soak_passes_and_writes_its_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    with serve(fake_server()) as url:
        options = SoakOptions(
            duration=12.0,
            concurrency=2,
            workload="mixed",
            report_dir=report,
            url=url,
            interval=1.0,
            show_progress=False,
            # Latency noise of a loaded test machine is not what this test is about; the
            # drift verdict is tested exactly in test_soak_report.
            max_drift=5.0,
        )
        verdict = await run_soak(options)
    assert verdict.passed, verdict.reasons
    assert verdict.requests.failed == 0 and verdict.requests.ok > 50
    assert verdict.requests.expected_errors > 0 and verdict.requests.aborted > 0
    assert verdict.memory is not None and verdict.memory.slope == 0.0
    assert [event["id"] for event in verdict.events] == [2]  # the old one is not this run's
    with (report / "soak.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == 12
    assert float(table[-1]["elapsed"]) == pytest.approx(12.0, abs=0.5)
    assert float(table[-1]["api_memory_bytes"]) == 100 * MIB
    assert table[-1]["kv_usage"] == "0.25" and table[-1]["kv_cache_bytes"] == ""
    assert table[0]["prefix_cache_hit_rate"] == ""
    assert {row["prefix_cache_hit_rate"] for row in table[1:]} == {"0.75"}
    assert table[0]["step_ms"] == ""
    steps = {
        (r["step_ms"], r["decode_tokens_per_step"], r["prefill_tokens_per_step"]) for r in table[1:]
    }
    assert steps == {("50.0", "8.0", "20.0")}
    assert sum(float(row["output_tokens_per_s"]) for row in table) > 0
    assert any(row["ttft_p99"] and row["tpot_p99"] for row in table)
    assert json.loads((report / "verdict.json").read_text())["passed"] is True
    assert (report / "verdict.md").read_text().startswith("# Soak: PASS")
    assert all((report / name).stat().st_size > 0 for name in PLOTS)


def test_failures_fail_the_verdict_and_the_exit_status(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(soak_command)
    report = tmp_path / "report"
    arguments = ["--duration", "4", "--concurrency", "2", "--workload", "agent"]
    arguments += ["--report", str(report), "--interval", "1", "--max-drift", "5"]
    with serve(fake_server(fail_every=5, alert=True)) as url:
        result = CliRunner().invoke(app, [*arguments, "--url", url])
    assert result.exit_code == 1, result.output
    verdict = json.loads((report / "verdict.json").read_text())
    assert verdict["passed"] is False
    assert verdict["requests"]["failed"] > 0
    assert verdict["reasons"][0] == f"{verdict['requests']['failed']} requests failed"
    assert verdict["reasons"][-1] == "1 alerts: ttft_drift"
    assert verdict["error_samples"][0].endswith('× 500: {"error":{"message":"scripted failure"}}')
    assert verdict["run"]["workload"] == "agent" and verdict["run"]["concurrency"] == 2
