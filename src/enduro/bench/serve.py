"""`enduro bench serve`: a closed-loop load generator for any OpenAI-compatible server.

At each concurrency level C, C workers send the workload's requests back to back (a worker
sends its next request as soon as its last one finished) until `num_requests` have been sent,
or, with `duration`, until that many seconds have passed; requests in flight then are awaited
and counted, so no slow request is dropped. `num_warmup` requests go first and are not counted:
they open connections and warm the server's caches at that batch size. An agent worker drives
its session step by step (each request carries the previous reply), so prefix reuse is
exercised. One workload generator serves every level, so no level repeats another's prompts
for a prefix cache to serve.

Figures are those of vLLM's serving benchmark: TTFT, TPOT ((e2e - TTFT) / (tokens - 1)), ITL
(gaps between token chunks), e2e, over the requests that finished ok; throughput over the
level's wall time; goodput = requests per second that finished ok within both SLOs.
"""

import asyncio
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from enduro.bench.http_client import OpenAIClient, RequestResult
from enduro.bench.serve_report import LevelResult, ServeBenchResult, write_report
from enduro.bench.soak import RETRY_PAUSE
from enduro.bench.soak_server import model_card, wait_ready
from enduro.bench.workloads import Session, Workload, WorkloadRequest
from enduro.guard.stats import percentile

ServeWorkload = Literal["chat", "long", "prefill", "agent"]
MAX_ERRORS = 5  # distinct failure texts kept per level


@dataclass(frozen=True)
class ServeBenchOptions:
    url: str
    """The server's base URL, e.g. http://127.0.0.1:8080 (without /v1)."""
    out_dir: Path
    label: str = "server"
    """Names the result files (<label>.json, ...) and the run in comparisons."""
    api_key: str | None = None
    model: str | None = None
    """The model name for requests; None: the first id of GET /v1/models."""
    workload: ServeWorkload = "chat"
    concurrencies: tuple[int, ...] = (1, 4, 16)
    num_requests: int = 32
    """Measured requests per level (when `duration` is None)."""
    duration: float | None = None
    """Seconds of load per level; None: send `num_requests`."""
    num_warmup: int = 2
    """Requests per level sent before the measured ones and not counted."""
    ttft_slo: float = 2.0
    """Seconds: the TTFT a request must not exceed to count in goodput."""
    tpot_slo: float = 0.2
    """Seconds: the TPOT a request must not exceed to count in goodput."""
    seed: int = 0
    max_tokens: int | None = None
    """Overrides the workload's max_tokens; None: its own (chat 128, long 64, prefill 1, agent
    60-200)."""
    ignore_eos: bool = True
    stream: bool = True
    max_model_len: int | None = None
    """Agent sessions end before the context is full; None: the server's /v1/models says."""
    ready_timeout: float = 600.0
    request_timeout: float = 600.0
    show_progress: bool = True
    command_line: str = ""

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("concurrencies must be at least 1")
        if self.num_requests < 1 or self.num_warmup < 0:
            raise ValueError("num_requests must be at least 1, num_warmup at least 0")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.ttft_slo <= 0 or self.tpot_slo <= 0:
            raise ValueError("the SLOs must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.workload not in get_args(ServeWorkload):
            raise ValueError(f"unknown workload {self.workload!r}")
        if not self.label or Path(self.label).name != self.label:
            raise ValueError(f"the label names files, so it cannot be {self.label!r}")

    def record(self) -> dict[str, Any]:
        """The options as JSON values, without the API key (results get shared) and the
        command line (the result holds it)."""
        values = asdict(self)
        del values["api_key"], values["command_line"]
        return {key: str(v) if isinstance(v, Path) else v for key, v in values.items()}


def meets_slo(result: RequestResult, ttft_slo: float, tpot_slo: float) -> bool:
    """Whether the request finished ok within both SLOs. A reply of one token has no TPOT. A
    reply without TTFT (not streamed) is held to the end-to-end time the SLOs allow together."""
    if not result.ok:
        return False
    if result.ttft is None:
        return result.latency <= ttft_slo + tpot_slo * max(0, result.num_output_tokens - 1)
    tpot = result.tpot
    return result.ttft <= ttft_slo and (tpot is None or tpot <= tpot_slo)


def summarize_level(
    concurrency: int, results: list[RequestResult], duration: float, options: ServeBenchOptions
) -> LevelResult:
    ok = [result for result in results if result.ok]
    ttfts = [result.ttft for result in ok if result.ttft is not None]
    tpots = [tpot for result in ok if (tpot := result.tpot) is not None]
    itls = [itl for result in ok for itl in result.inter_token_latencies]
    e2es = [result.latency for result in ok]
    prompt_counts = [result.prompt_tokens for result in ok if result.prompt_tokens is not None]
    num_input_tokens = sum(prompt_counts) if prompt_counts else None
    num_output_tokens = sum(result.num_output_tokens for result in ok)
    num_good = sum(meets_slo(result, options.ttft_slo, options.tpot_slo) for result in results)
    errors = list(dict.fromkeys(f"{r.status}: {r.error}"[:200] for r in results if not r.ok))
    per_s = 1 / duration if duration > 0 else 0.0
    return LevelResult(
        concurrency=concurrency,
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        num_good=num_good,
        duration=duration,
        num_input_tokens=num_input_tokens,
        num_output_tokens=num_output_tokens,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        e2e_p50=percentile(e2es, 50),
        e2e_p99=percentile(e2es, 99),
        requests_per_s=len(ok) * per_s,
        input_tokens_per_s=None if num_input_tokens is None else num_input_tokens * per_s,
        output_tokens_per_s=num_output_tokens * per_s,
        goodput=num_good * per_s,
        good_share=num_good / len(results) if results else 0.0,
        errors=errors[:MAX_ERRORS],
    )


def next_in_session(workload: Workload, session: Session | None) -> tuple[Session, WorkloadRequest]:
    """The session's next request; when it is over (or there is none), a new session's first."""
    while True:
        if session is not None and (request := session.next_request()) is not None:
            return session, request
        session = workload.next_session()


@dataclass
class Load:
    """One closed loop's shared state: how many requests its workers may still send."""

    quota: int | None  # requests to send; None: until the deadline
    deadline: float | None = None  # monotonic seconds; None: until the quota is sent
    task: TaskID | None = None  # the progress bar it advances; None: warm-up, not shown
    num_started: int = 0
    results: list[RequestResult] = field(default_factory=list)

    def claim(self) -> bool:
        """Whether a worker may send one more request (and counts it as sent)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.quota is not None and self.num_started >= self.quota:
            return False
        self.num_started += 1
        return True


class ServeBench:
    """One run against one server: sends the levels' loads and summarizes them."""

    def __init__(
        self,
        options: ServeBenchOptions,
        client: OpenAIClient,
        model: str | None,
        workload: Workload,
    ) -> None:
        self.options = options
        self.client = client
        self.model = model
        self.workload = workload
        self.progress = Progress(
            TextColumn("[bold]{task.description}[/bold]"),
            BarColumn(),
            TextColumn("{task.completed:.0f} requests, {task.fields[num_failed]} failed"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not options.show_progress,
        )

    async def run_level(self, concurrency: int) -> LevelResult:
        options = self.options
        await self.run_load(Load(quota=options.num_warmup), concurrency)
        description = f"{options.label} {options.workload} ×{concurrency}"
        quota = options.num_requests if options.duration is None else None
        task = self.progress.add_task(description, total=quota, num_failed=0)
        started = time.monotonic()
        deadline = None if options.duration is None else started + options.duration
        load = Load(quota, deadline, task)
        await self.run_load(load, concurrency)
        duration = time.monotonic() - started
        self.progress.update(task, total=len(load.results))  # a duration bar ends full
        return summarize_level(concurrency, load.results, duration, options)

    async def run_load(self, load: Load, concurrency: int) -> None:
        await asyncio.gather(*(self.worker(load) for _ in range(concurrency)))

    async def worker(self, load: Load) -> None:
        session: Session | None = None
        while load.claim():
            session, request = next_in_session(self.workload, session)
            result = await self.client.send(self.prepared(request), self.model)
            load.results.append(result)
            self.show(load)
            if result.ok:
                session.add_reply(result.text, result.prompt_tokens)
            else:
                session = None  # its history would lack this reply: start a new one
            if result.status is None:
                await asyncio.sleep(RETRY_PAUSE)  # no server: do not spin on it

    def prepared(self, request: WorkloadRequest) -> WorkloadRequest:
        body = dict(request.body)
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        if self.options.ignore_eos:
            body["ignore_eos"] = True
        return replace(request, body=body, stream=self.options.stream)

    def show(self, load: Load) -> None:
        if load.task is not None:
            num_failed = sum(not result.ok for result in load.results)
            self.progress.update(load.task, completed=len(load.results), num_failed=num_failed)


async def run_serve_bench(options: ServeBenchOptions) -> ServeBenchResult:
    """Runs every level in turn and writes the report into `options.out_dir`."""
    start_time = time.time()
    async with OpenAIClient(options.url, options.api_key, options.request_timeout) as client:
        await wait_ready(client, options.ready_timeout, None, options.show_progress)
        card = await model_card(client)
        model = options.model or card.get("id")
        max_model_len = options.max_model_len or card.get("max_model_len")
        bench = ServeBench(
            options, client, model, Workload(options.workload, options.seed, max_model_len)
        )
        with bench.progress:
            levels = [await bench.run_level(concurrency) for concurrency in options.concurrencies]
    result = ServeBenchResult(
        label=options.label,
        url=options.url,
        model=model,
        workload=options.workload,
        start_time=start_time,
        command_line=options.command_line,
        options=options.record(),
        levels=levels,
    )
    write_report(result, options.out_dir)
    return result
