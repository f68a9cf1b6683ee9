"""`enduro soak`: load a server for a long time and judge whether it stayed flat.

C workers send a workload's sessions back to back until the deadline. Every interval the runner
takes a Row: what finished in the interval (by outcome), latency percentiles, throughput, and
the server's memory and KV figures scraped from /metrics; it also collects the server's alert
events from /debug/events. The report (CSV, PNGs, verdict) comes from `soak_report`.

Outcomes: ok; aborted (the client closed the stream on purpose); expected error (an invalid
request answered with 400); failed (anything else: 5xx, connection errors, other statuses, an
error frame mid-stream, a 200 for an invalid request).
"""

import asyncio
import contextlib
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from enduro.bench.http_client import OpenAIClient, RequestResult
from enduro.bench.soak_report import (
    MIB,
    RequestSample,
    Row,
    RunInfo,
    Verdict,
    VerdictCriteria,
    compute_verdict,
    write_report,
)
from enduro.bench.soak_server import SoakError, model_card, server_for, wait_ready
from enduro.bench.workloads import Session, Workload, WorkloadRequest
from enduro.guard.stats import percentile

SoakWorkload = Literal["mixed", "agent"]
MODEL_HELP = "Served model name for requests (default: the first of GET /v1/models)."
WARMUP_HELP = "Seconds left out of the memory fit and drift (default: 10 % of the duration)."
DRIFT_HELP = (
    "Relative rise allowed of p99 TTFT and p99 TPOT, first vs last 10 % of the run after warm-up."
)
SERVE_HELP = (
    "An argument for `enduro serve` when no --url is given, e.g. --serve-arg=--guard=observe."
)
FAULTS_HELP = (
    "Faults to plant, as JSON for POST /debug/faults, e.g. '{\"leak_bytes_per_request\": 262144}'"
    " (the server needs --enable-fault-injection)."
)
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_ERROR_SAMPLES = 20  # distinct error texts kept for the verdict
# Seconds a worker waits after a connection error, so a dead server is not spun on.
RETRY_PAUSE = 0.1
# Prometheus sample (name, process label, state label) → Row field.
METRICS = {
    ("enduro_process_memory_bytes", "api", None): "api_memory_bytes",
    ("enduro_process_memory_bytes", "engine", None): "engine_memory_bytes",
    ("enduro_malloc_bytes", "engine", "allocated"): "engine_malloc_allocated_bytes",
    ("enduro_malloc_bytes", "engine", "held"): "engine_malloc_held_bytes",
    ("enduro_kv_cache_usage_ratio", None, None): "kv_usage",
    ("enduro_kv_cache_fragmentation_ratio", None, None): "kv_fragmentation",
    ("enduro_kv_cache_bytes", None, None): "kv_cache_bytes",
    ("enduro_engine_restarts_total", None, None): "engine_restarts",
    # Cumulative; a Row gets the interval's hit rate (`interval_hit_rate`).
    ("enduro_prefix_cache_queries_tokens_total", None, None): "prefix_queries",
    ("enduro_prefix_cache_hits_tokens_total", None, None): "prefix_hits",
    # Cumulative; a Row gets the interval's step figures (`interval_steps`).
    ("enduro_engine_step_seconds_count", None, None): "steps",
    ("enduro_engine_step_seconds_sum", None, None): "step_seconds",
    ("enduro_engine_decode_tokens_total", None, None): "decode_tokens",
    ("enduro_engine_prefill_tokens_total", None, None): "prefill_tokens",
}
STEP_COUNTERS = ("steps", "step_seconds", "decode_tokens", "prefill_tokens")


def interval_hit_rate(
    last: tuple[float, float] | None, now: tuple[float, float] | None
) -> float | None:
    """Share of the prompt tokens looked up between two (queries, hits) readings of the
    prefix-cache counters that the cache served; None without lookups in between, or when the
    counters went back (a new engine worker started from zero)."""
    if last is None or now is None or now[0] <= last[0] or now[1] < last[1]:
        return None
    return (now[1] - last[1]) / (now[0] - last[0])


def interval_steps(last: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """Row fields for the engine steps between two readings of STEP_COUNTERS: mean step time
    and tokens per step; none when a reading lacks a counter, without a step in between, or
    when a counter went back (a new engine worker started from zero)."""
    if any(name not in last or name not in now for name in STEP_COUNTERS):
        return {}
    delta = {name: now[name] - last[name] for name in STEP_COUNTERS}
    if delta["steps"] <= 0 or min(delta.values()) < 0:
        return {}
    return {
        "step_ms": 1000 * delta["step_seconds"] / delta["steps"],
        "decode_tokens_per_step": delta["decode_tokens"] / delta["steps"],
        "prefill_tokens_per_step": delta["prefill_tokens"] / delta["steps"],
    }


def parse_duration(text: str) -> float:
    """Seconds from "180", "90s", "3m", "30m" or "1h"."""
    text = text.strip().lower()
    unit = DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 180, 3m, 1h)") from None
    if not seconds > 0:
        raise ValueError("the duration must be positive")
    return seconds


@dataclass(frozen=True)
class SoakOptions:
    duration: float
    """Seconds of load."""
    concurrency: int
    """Workers, each sending one request at a time."""
    workload: SoakWorkload
    report_dir: Path
    url: str | None = None
    """The server to load; None: start `enduro serve` with `serve_args`."""
    api_key: str | None = None
    model: str | None = None
    """The served model name for requests; None: the first id of GET /v1/models."""
    interval: float = 5.0
    """Seconds between rows."""
    seed: int = 0
    warmup: float | None = None
    """Seconds left out of the memory fit and the drift; None: 10 % of the duration."""
    max_memory_slope: float = 64 * MIB
    """Bytes per hour of memory growth allowed."""
    min_memory_growth: float = 16 * MIB
    """Bytes a memory slope must add over the fitted span to fail the soak."""
    max_drift: float = 0.25
    """Relative rise of p99 TTFT and p99 TPOT allowed (first vs last 10 % of the run)."""
    fail_on_alert: bool = True
    serve_args: tuple[str, ...] = ()
    ready_timeout: float = 600.0
    """Seconds to wait for GET /ready to answer 200."""
    stop_timeout: float = 60.0
    """Seconds between SIGTERM and SIGKILL for a server the soak started."""
    show_progress: bool = True
    command_line: str = ""
    faults: dict[str, Any] | None = None
    """Planted faults (POST /debug/faults) armed `faults_at` seconds into the load: how a
    guard demo shows what it detects. The server needs --enable-fault-injection."""
    faults_at: float = 0.0

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.interval <= 0:
            raise ValueError("duration and interval must be positive")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.workload not in ("mixed", "agent"):
            raise ValueError(f"unknown workload {self.workload!r}")
        if self.warmup is not None and not 0 <= self.warmup < self.duration:
            raise ValueError("warmup must be in [0, duration)")
        if self.max_drift < 0 or self.ready_timeout <= 0 or self.stop_timeout <= 0:
            raise ValueError("max_drift must be >= 0, ready_timeout and stop_timeout > 0")

    @property
    def criteria(self) -> VerdictCriteria:
        warmup = self.warmup if self.warmup is not None else 0.1 * self.duration
        return VerdictCriteria(
            warmup,
            self.max_memory_slope,
            self.max_drift,
            self.fail_on_alert,
            self.min_memory_growth,
        )


@dataclass
class Tally:
    """What finished since the last row."""

    num_ok: int = 0
    num_failed: int = 0
    num_expected_errors: int = 0
    num_aborted: int = 0
    num_output_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)

    def add(self, request: WorkloadRequest, result: RequestResult) -> str | None:
        """Counts the result; its error text when it failed."""
        self.num_output_tokens += result.num_output_tokens
        if result.ttft is not None:
            self.ttfts.append(result.ttft)
        if (tpot := result.tpot) is not None:
            self.tpots.append(tpot)
        if request.expect_error:
            expected = result.status == 400
            self.num_expected_errors += expected
            self.num_failed += not expected
            return None if expected else f"expected 400, got {result.status}: {result.error}"
        if not result.ok:
            self.num_failed += 1
            return f"{result.status}: {result.error}"
        self.num_aborted += result.aborted
        self.num_ok += not result.aborted
        return None


def read_metrics(text: str) -> dict[str, float]:
    """Row fields from the Prometheus text of GET /metrics; series not there are left out."""
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = METRICS.get((sample.name, labels.get("process"), labels.get("state")))
            if key is not None:
                figures[key] = sample.value
    return figures


class Soak:
    """One run's state: the tally being filled, the rows taken, the events seen."""

    def __init__(self, options: SoakOptions, client: OpenAIClient, started: float) -> None:
        self.options = options
        self.client = client
        self.started = started  # unix time the command began: events before it are old
        self.tally = Tally()
        self.rows: list[Row] = []
        self.events: dict[int, dict[str, Any]] = {}
        self.errors: Counter[str] = Counter()
        self.samples: list[RequestSample] = []
        self.prefix_counts: tuple[float, float] | None = None  # queries, hits at the last row
        self.step_counts: dict[str, float] = {}  # STEP_COUNTERS at the last row
        self.events_supported = True
        self.load_start = 0.0  # monotonic; set when the load starts
        self.load_start_time = 0.0  # the same in unix time

    async def worker(self, workload: Workload, model: str, stagger: float, deadline: float) -> None:
        await asyncio.sleep(stagger)  # sessions start at different times
        # The first session joins at a random step, so the run starts with the mix of agent
        # context lengths it keeps later and its first minutes are a fair baseline for drift.
        session = workload.next_session(joining=True)
        while time.monotonic() < deadline:
            await self.run_session(session, model, deadline)
            session = workload.next_session()

    async def run_session(self, session: Session, model: str, deadline: float) -> None:
        while time.monotonic() < deadline and (request := session.next_request()) is not None:
            result = await self.client.send(request, model)
            if (error := self.tally.add(request, result)) is not None:
                self.note_error(error[:200])
            elif result.ok and not result.aborted and not request.expect_error:
                elapsed = time.monotonic() - self.load_start
                self.samples.append(RequestSample(elapsed, result.ttft, result.tpot))
            if result.status is None:
                await asyncio.sleep(RETRY_PAUSE)
            if not result.ok or result.aborted:
                return
            session.add_reply(result.text, result.prompt_tokens)

    def note_error(self, text: str) -> None:
        """Counts a failure's text; only the first MAX_ERROR_SAMPLES distinct texts are kept."""
        if text in self.errors or len(self.errors) < MAX_ERROR_SAMPLES:
            self.errors[text] += 1

    async def take_row(self) -> Row:
        tally, self.tally = self.tally, Tally()
        elapsed = time.monotonic() - self.load_start
        since = elapsed - (self.rows[-1].elapsed if self.rows else 0.0)
        figures = await self.scrape()
        queries, hits = figures.pop("prefix_queries", None), figures.pop("prefix_hits", None)
        counts = (queries, hits) if queries is not None and hits is not None else None
        hit_rate = interval_hit_rate(self.prefix_counts, counts)
        self.prefix_counts = counts
        step_counts = {name: figures.pop(name) for name in STEP_COUNTERS if name in figures}
        steps = interval_steps(self.step_counts, step_counts)
        self.step_counts = step_counts
        await self.poll_events()
        row = Row(
            time=time.time(),
            elapsed=elapsed,
            num_ok=tally.num_ok,
            num_failed=tally.num_failed,
            num_expected_errors=tally.num_expected_errors,
            num_aborted=tally.num_aborted,
            ttft_p50=percentile(tally.ttfts, 50),
            ttft_p99=percentile(tally.ttfts, 99),
            tpot_p50=percentile(tally.tpots, 50),
            tpot_p99=percentile(tally.tpots, 99),
            output_tokens_per_s=tally.num_output_tokens / since if since > 0 else 0.0,
            prefix_cache_hit_rate=hit_rate,
            **steps,
            **figures,
        )
        self.rows.append(row)
        return row

    async def scrape(self) -> dict[str, float]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await self.client.http.get("/metrics")
            if response.status_code == 200:
                return read_metrics(response.text)
        return {}

    async def poll_events(self) -> None:
        """Keeps the events of this run, once each (by id); a server without the endpoint
        (404) is not asked again."""
        if not self.events_supported:
            return
        # A body of another shape (AttributeError) is skipped like a failed poll.
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            response = await self.client.http.get("/debug/events")
            self.events_supported = response.status_code != 404
            if response.status_code != 200:
                return
            for event in response.json().get("data", []):
                when, event_id = event.get("time"), event.get("id")
                if (
                    isinstance(event_id, int)
                    and isinstance(when, int | float)
                    and when >= self.started
                ):
                    self.events.setdefault(event_id, event)

    async def arm_faults(self, faults: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, self.load_start + self.options.faults_at - time.monotonic()))
        response = await self.client.http.post("/debug/faults", json=faults)
        if response.status_code != 200:
            raise SoakError(f"arming faults failed: {response.status_code} {response.text}")

    async def run_load(self, workload: Workload, model: str, show: "SoakProgress") -> None:
        options = self.options
        self.load_start, self.load_start_time = time.monotonic(), time.time()
        deadline = self.load_start + options.duration
        spread = min(10.0, 0.05 * options.duration) / options.concurrency
        workers = [
            asyncio.create_task(self.worker(workload, model, i * spread, deadline))
            for i in range(options.concurrency)
        ]
        if options.faults is not None:
            workers.append(asyncio.create_task(self.arm_faults(options.faults)))
        try:
            tick = self.load_start
            while tick < deadline:
                tick = min(tick + options.interval, deadline)
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
                show.update(await self.take_row(), self)
        finally:
            # Requests still in flight at the deadline are dropped, not counted.
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


class SoakProgress:
    """A rich progress bar: elapsed/duration, requests, errors, memory."""

    def __init__(self, options: SoakOptions) -> None:
        self.progress = Progress(
            TextColumn("[bold]soak[/bold] {task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not options.show_progress,
        )
        description = f"{options.workload} ×{options.concurrency}"
        self.task = self.progress.add_task(description, total=options.duration, status="")

    def update(self, row: Row, soak: Soak) -> None:
        rows = soak.rows
        done = sum(r.num_ok + r.num_aborted + r.num_expected_errors for r in rows)
        failed = sum(r.num_failed for r in rows)
        memory = (row.api_memory_bytes or 0.0) + (row.engine_memory_bytes or 0.0)
        status = f"{done} ok, {failed} failed, {len(soak.events)} events, {memory / MIB:.0f} MiB"
        self.progress.update(self.task, completed=row.elapsed, status=status)


async def run_soak(options: SoakOptions) -> Verdict:
    """Runs the soak and writes its report; the verdict says whether it passed."""
    started = time.time()
    log_path = options.report_dir / "server.log"
    serving = server_for(options.url, options.serve_args, log_path, options.stop_timeout)
    async with serving as (url, process), OpenAIClient(url, options.api_key) as client:
        await wait_ready(client, options.ready_timeout, process, options.show_progress)
        card = await model_card(client)
        model = options.model or str(card.get("id"))
        workload = Workload(options.workload, options.seed, card.get("max_model_len"))
        soak = Soak(options, client, started)
        show = SoakProgress(options)
        with show.progress:
            await soak.run_load(workload, model, show)
    events = sorted(soak.events.values(), key=lambda event: event["id"])
    run = RunInfo(
        options.workload,
        options.concurrency,
        options.duration,
        start_time=soak.load_start_time,
        command_line=options.command_line,
    )
    errors = [f"{count} × {text}" for text, count in soak.errors.most_common()]
    verdict = compute_verdict(soak.rows, soak.samples, events, options.criteria, run, errors)
    write_report(options.report_dir, soak.rows, soak.samples, verdict, events)
    return verdict


def soak_command(
    duration: Annotated[str, typer.Option("--duration", help="Seconds, or 90s, 3m, 1h.")],
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)],
    workload: Annotated[SoakWorkload, typer.Option("--workload")],
    report: Annotated[Path, typer.Option("--report", help="Directory for CSV, PNGs, verdict.")],
    url: Annotated[str | None, typer.Option("--url", help="Default: start `enduro serve`.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="ENDURO_API_KEY")] = None,
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds.")] = 5.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    warmup: Annotated[float | None, typer.Option("--warmup", min=0.0, help=WARMUP_HELP)] = None,
    max_memory_slope: Annotated[
        float, typer.Option("--max-memory-slope", help="Bytes per hour (64 MiB).")
    ] = 64 * MIB,
    min_memory_growth: Annotated[
        float,
        typer.Option("--min-memory-growth", min=0.0, help="Bytes over the fit (16 MiB)."),
    ] = 16 * MIB,
    max_drift: Annotated[float, typer.Option("--max-drift", min=0.0, help=DRIFT_HELP)] = 0.25,
    fail_on_alert: Annotated[bool, typer.Option("--fail-on-alert/--no-fail-on-alert")] = True,
    serve_arg: Annotated[list[str] | None, typer.Option("--serve-arg", help=SERVE_HELP)] = None,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", min=1.0)] = 600.0,
    faults: Annotated[str | None, typer.Option("--faults", help=FAULTS_HELP)] = None,
    faults_at: Annotated[str, typer.Option("--faults-at", help="When to arm them.")] = "0",
) -> None:
    """Load a server for a long time; write a time series, plots and a verdict (exit 1: FAIL)."""
    try:
        options = SoakOptions(
            duration=parse_duration(duration),
            concurrency=concurrency,
            workload=workload,
            report_dir=report,
            url=url,
            api_key=api_key,
            model=model,
            interval=interval,
            seed=seed,
            warmup=warmup,
            max_memory_slope=max_memory_slope,
            min_memory_growth=min_memory_growth,
            max_drift=max_drift,
            fail_on_alert=fail_on_alert,
            serve_args=tuple(serve_arg or ()),
            ready_timeout=ready_timeout,
            command_line=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            faults=json.loads(faults) if faults is not None else None,
            faults_at=parse_duration(faults_at) if faults_at != "0" else 0.0,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    console = Console(stderr=True)
    try:
        verdict = asyncio.run(run_soak(options))
    except SoakError as error:
        hint = "" if url is not None else f" (its output: {report / 'server.log'})"
        console.print(f"[red]soak: {error}{hint}[/red]")
        raise typer.Exit(2) from error
    console.print(f"[bold]{'PASS' if verdict.passed else 'FAIL'}[/bold]: report in {report}")
    for reason in verdict.reasons:
        console.print(f"  - {reason}")
    if not verdict.passed:
        raise typer.Exit(1)
