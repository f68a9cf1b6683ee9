"""`enduro bench serve` against a fake OpenAI-like server with scripted delays, and the
comparison of result files."""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from typer.testing import CliRunner

from enduro.bench.http_client import RequestResult
from enduro.bench.serve import ServeBenchOptions, meets_slo, run_serve_bench
from enduro.bench.serve_command import bench_compare_command, bench_serve_command
from enduro.bench.serve_report import LevelResult, ServeBenchResult, compare_results, read_result
from enduro.bench.workloads import SYSTEM_PROMPT
from enduro.server.protocol import ChatCompletionRequest
from tests.server.fakes import serve

NUM_TOKENS = 4  # every reply, whatever max_tokens says: fast tests, known token counts
PROMPT_TOKENS = 10  # what the fake's usage reports
REPLY = "".join(f"t{i} " for i in range(NUM_TOKENS))
TTFT, TPOT = 0.02, 0.01  # the fake's delays for a plain request
SLOW_TTFT, SLOW_TPOT = 0.4, 0.12  # the scripted misses, well beyond the SLOs below
TTFT_SLO, TPOT_SLO = 0.2, 0.06


def sse(chunk: object) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


@dataclass
class Fake:
    """The fake's script (by the 1-based arrival number of a request, warm-ups included) and
    what it saw."""

    slow_ttft_every: int | None = None
    slow_tpot_every: int | None = None
    fail_every: int | None = None
    has_ready: bool = True
    bodies: list[dict[str, Any]] = field(default_factory=list)
    num_in_flight: int = 0
    max_in_flight: int = 0

    def delays(self, number: int) -> tuple[float, float]:
        ttft = SLOW_TTFT if self.slow_ttft_every and number % self.slow_ttft_every == 0 else TTFT
        tpot = SLOW_TPOT if self.slow_tpot_every and number % self.slow_tpot_every == 0 else TPOT
        return ttft, tpot

    async def tokens(self, number: int) -> AsyncIterator[str]:
        ttft, tpot = self.delays(number)
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            for i in range(NUM_TOKENS):
                await asyncio.sleep(ttft if i == 0 else tpot)
                yield sse({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]})
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NUM_TOKENS}
            yield sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            self.num_in_flight -= 1

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            ChatCompletionRequest.model_validate_json(await request.body())  # a valid body
            self.bodies.append(await request.json())
            number = len(self.bodies)
            if self.fail_every is not None and number % self.fail_every == 0:
                return JSONResponse({"error": {"message": "scripted failure"}}, 500)
            return StreamingResponse(self.tokens(number), media_type="text/event-stream")

        if self.has_ready:
            app.get("/ready")(lambda: {"status": "ok"})
        app.get("/health")(lambda: {"status": "ok"})
        app.get("/v1/models")(lambda: {"data": [{"id": "fake-model", "max_model_len": 32768}]})
        return app


def options(url: str, out_dir: Path, **changes: Any) -> ServeBenchOptions:
    values: dict[str, Any] = {
        "concurrencies": (2,),
        "num_requests": 8,
        "num_warmup": 2,
        "ttft_slo": TTFT_SLO,
        "tpot_slo": TPOT_SLO,
        "max_tokens": NUM_TOKENS,
        "show_progress": False,
        "label": "fake",
    }
    return ServeBenchOptions(url, out_dir, **{**values, **changes})


@pytest.mark.asyncio
async def test_levels_count_requests_and_goodput_only_within_the_slos(tmp_path: Path) -> None:
    # Arrival numbers: level 1 warms up with 1-2 and measures 3-10, level 2 warms up with 11-12
    # and measures 13-20. Misses: level 1 {4, 8} TTFT, {3, 6, 9} TPOT: 3 good; level 2 {16, 20}
    # TTFT, {15, 18} TPOT: 4 good.
    fake = Fake(slow_ttft_every=4, slow_tpot_every=3)
    with serve(fake.app()) as url:
        result = await run_serve_bench(options(url, tmp_path, concurrencies=(1, 2), api_key="k"))
    assert len(fake.bodies) == 20 and fake.max_in_flight == 2
    assert all(body["max_tokens"] == NUM_TOKENS and body["ignore_eos"] for body in fake.bodies)
    assert all(body["model"] == "fake-model" and body["stream"] for body in fake.bodies)
    one, two = result.levels
    assert (one.concurrency, one.num_ok, one.num_failed, one.num_good) == (1, 8, 0, 3)
    assert (two.concurrency, two.num_ok, two.num_failed, two.num_good) == (2, 8, 0, 4)
    assert one.good_share == 3 / 8 and two.good_share == 4 / 8
    assert one.goodput == pytest.approx(3 / one.duration)
    assert one.requests_per_s == pytest.approx(8 / one.duration)
    assert (one.num_output_tokens, one.num_input_tokens) == (8 * NUM_TOKENS, 8 * PROMPT_TOKENS)
    assert one.output_tokens_per_s == pytest.approx(8 * NUM_TOKENS / one.duration)
    assert one.input_tokens_per_s == pytest.approx(8 * PROMPT_TOKENS / one.duration)
    # Delays are floors; a busy test machine adds to them.
    assert one.ttft_p50 is not None and TTFT <= one.ttft_p50 < TTFT + 0.1
    assert one.ttft_p99 is not None and SLOW_TTFT <= one.ttft_p99 < SLOW_TTFT + 0.15
    assert one.tpot_p50 is not None and one.tpot_p50 < TPOT + 0.04
    assert one.tpot_p99 is not None and SLOW_TPOT - 0.03 < one.tpot_p99 < SLOW_TPOT + 0.05
    assert one.itl_p50 is not None and one.itl_p50 < TPOT + 0.04
    assert one.e2e_p99 is not None and one.e2e_p99 >= SLOW_TTFT + 3 * TPOT


@pytest.mark.asyncio
async def test_the_report_holds_every_figure_but_the_api_key(tmp_path: Path) -> None:
    with serve(Fake().app()) as url:
        result = await run_serve_bench(options(url, tmp_path, concurrencies=(1, 2), api_key="k"))
    for name in ("fake.json", "fake.md", "fake_throughput.png", "fake_latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    record = json.loads((tmp_path / "fake.json").read_text())
    assert "api_key" not in record["options"] and record["options"]["concurrencies"] == [1, 2]
    assert record["timestamp"].startswith("20")
    assert replace(read_result(tmp_path / "fake.json"), options={}) == replace(result, options={})
    rows = [
        line for line in (tmp_path / "fake.md").read_text().splitlines() if line.startswith("| ")
    ]
    assert [row.split(" | ")[:3] for row in rows[1:]] == [["| 1", "8", "0"], ["| 2", "8", "0"]]


@pytest.mark.asyncio
async def test_failures_are_counted_and_miss_the_goodput(tmp_path: Path) -> None:
    fake = Fake(fail_every=5)  # measured 3-10: 5 and 10 fail
    with serve(fake.app()) as url:
        (level,) = (await run_serve_bench(options(url, tmp_path))).levels
    assert len(fake.bodies) == 10
    assert (level.num_ok, level.num_failed, level.num_good) == (6, 2, 6)
    assert level.good_share == 6 / 8
    assert level.errors == ['500: {"error":{"message":"scripted failure"}}']


@pytest.mark.asyncio
async def test_agent_workers_drive_their_sessions_step_by_step(tmp_path: Path) -> None:
    fake = Fake()
    with serve(fake.app()) as url:
        bench = options(url, tmp_path, workload="agent", num_requests=6, num_warmup=0)
        (level,) = (await run_serve_bench(bench)).levels
    assert level.num_ok == 6 and len(fake.bodies) == 6
    # Two workers, one session each (a session has at least 4 steps, the workers 6 between
    # them): two first steps, and every later step carries the replies before it.
    histories = [body["messages"] for body in fake.bodies]
    assert sorted(len(messages) for messages in histories)[:3] == [2, 2, 4]
    for messages in histories:
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert messages[2::2] == [{"role": "assistant", "content": REPLY}] * (
            len(messages) // 2 - 1
        )


@pytest.mark.asyncio
async def test_a_duration_level_counts_every_request_it_sent(tmp_path: Path) -> None:
    fake = Fake(has_ready=False)  # readiness from /health, as for llama-server
    with serve(fake.app()) as url:
        bench = options(url, tmp_path, duration=0.3, num_warmup=1)
        (level,) = (await run_serve_bench(bench)).levels
    assert level.num_ok >= 2 and level.num_failed == 0
    assert len(fake.bodies) == 1 + level.num_ok
    assert level.duration >= 0.3


def test_meets_slo() -> None:
    def streamed(ttft: float, latency: float, num_tokens: int) -> RequestResult:
        return RequestResult(200, ttft=ttft, latency=latency, num_output_tokens=num_tokens)

    assert meets_slo(streamed(0.2, 0.5, 4), ttft_slo=0.2, tpot_slo=0.1)
    assert not meets_slo(streamed(0.3, 0.5, 4), ttft_slo=0.2, tpot_slo=0.1)
    assert not meets_slo(streamed(0.2, 0.6, 4), ttft_slo=0.2, tpot_slo=0.1)  # TPOT 0.133
    assert meets_slo(streamed(0.2, 9.0, 1), ttft_slo=0.2, tpot_slo=0.1)  # no TPOT
    assert meets_slo(RequestResult(200, latency=0.5, num_output_tokens=4), 0.2, 0.1)
    assert not meets_slo(RequestResult(200, latency=0.6, num_output_tokens=4), 0.2, 0.1)
    assert not meets_slo(RequestResult(500, "boom", latency=0.01), 0.2, 0.1)


@pytest.mark.parametrize(
    "changes",
    [
        {"concurrencies": ()},
        {"concurrencies": (1, 0)},
        {"num_requests": 0},
        {"duration": 0.0},
        {"ttft_slo": 0.0},
        {"max_tokens": 0},
        {"workload": "mixed"},
        {"label": "a/b"},
    ],
)
def test_options_refuse(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServeBenchOptions("http://x", Path("out"), **changes)


def synthetic_level(concurrency: int, **figures: Any) -> LevelResult:
    values: dict[str, Any] = {field: None for field in LevelResult.__dataclass_fields__}
    values.update(concurrency=concurrency, num_ok=8, num_failed=0, num_good=8, duration=4.0)
    values.update(num_output_tokens=400, requests_per_s=2.0, good_share=1.0, errors=[])
    return LevelResult(**{**values, "output_tokens_per_s": 100.0, "goodput": 1.0, **figures})


def write_run(path: Path, label: str, levels: list[LevelResult], workload: str = "chat") -> Path:
    run = ServeBenchResult(label, "http://x", "m", workload, 0.0, "", {}, levels)
    path.write_text(json.dumps(asdict(run)))
    return path


LLAMA = {"ttft_p50": 0.1, "ttft_p99": 0.2, "tpot_p50": 0.02, "tpot_p99": 0.04, "e2e_p99": 3.0}
ENDURO = {"output_tokens_per_s": 150.0, "requests_per_s": 3.0, "goodput": 1.5}
ENDURO |= {"ttft_p50": 0.05, "ttft_p99": 0.3, "tpot_p50": 0.01, "tpot_p99": 0.05, "e2e_p99": 1.5}


def test_compare_gives_exact_ratios_against_the_baseline(tmp_path: Path) -> None:
    base = write_run(tmp_path / "llama.json", "llama-server", [synthetic_level(1, **LLAMA)])
    other = write_run(
        tmp_path / "enduro.json", "enduro", [synthetic_level(1, **ENDURO), synthetic_level(4)]
    )
    rows = compare_results([other, base], "llama-server", tmp_path / "out").splitlines()[4:]
    assert rows[2:] == [
        "| 1 | llama-server | 100.0 | 2.00 | 1.00 | 100.0 | 200.0 | 20.0 | 40.0 | 3.00 |",
        "| 1 | enduro | 150.0 (1.50×) | 3.00 (1.50×) | 1.50 (1.50×) | 50.0 (0.50×) "
        "| 300.0 (1.50×) | 10.0 (0.50×) | 50.0 (1.25×) | 1.50 (0.50×) |",
        "| 4 | enduro | 100.0 | 2.00 | 1.00 | – | – | – | – | – |",
    ]
    assert (tmp_path / "out" / "compare.md").is_file()
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_compare_refuses_runs_that_do_not_compare(tmp_path: Path) -> None:
    base = write_run(tmp_path / "a.json", "a", [synthetic_level(1)])
    same_label = write_run(tmp_path / "b.json", "a", [synthetic_level(1)])
    agent = write_run(tmp_path / "c.json", "c", [synthetic_level(1)], workload="agent")
    for paths, baseline in [([base], "x"), ([base, same_label], "a"), ([base, agent], "a")]:
        with pytest.raises(ValueError):
            compare_results(paths, baseline, tmp_path / "out")


def test_the_commands_run_and_compare(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("serve")(bench_serve_command)
    app.command("compare")(bench_compare_command)
    arguments = ["serve", "--concurrency", "1", "--concurrency", "2", "--num-requests", "2"]
    arguments += ["--warmup", "0", "--max-tokens", "4", "--label", "fake", "--out", str(tmp_path)]
    with serve(Fake().app()) as url:
        result = CliRunner().invoke(app, [*arguments, "--url", url])
    assert result.exit_code == 0, result.output
    run = read_result(tmp_path / "fake.json")
    assert [level.num_ok for level in run.levels] == [2, 2]
    assert run.command_line and run.options["ttft_slo"] == 2.0
    write_run(tmp_path / "base.json", "base", run.levels)
    compare = ["compare", str(tmp_path / "fake.json"), str(tmp_path / "base.json")]
    result = CliRunner().invoke(app, [*compare, "--baseline", "base", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "(1.00×)" in (tmp_path / "compare.md").read_text()
