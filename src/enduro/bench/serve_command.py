"""`enduro bench serve` and `enduro bench compare`: the command lines of the serving benchmark
(`serve`) and of its comparison of runs (`serve_report`)."""

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown

from enduro.bench.serve import ServeBenchOptions, ServeWorkload, run_serve_bench
from enduro.bench.serve_report import compare_results, run_markdown
from enduro.bench.soak import MODEL_HELP, parse_duration
from enduro.bench.soak_server import SoakError

OUT = Path("bench-results")
EOS_HELP = "Ask for every max_tokens token (ignore_eos), so all servers generate the same work."
LEN_HELP = "Context limit for agent sessions when /v1/models does not give max_model_len."


def bench_serve_command(
    url: Annotated[str, typer.Option("--url", help="Base URL, e.g. http://127.0.0.1:8080.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for JSON, markdown, PNGs.")] = OUT,
    label: Annotated[str, typer.Option("--label", help="Names the files, e.g. enduro.")] = "server",
    workload: Annotated[ServeWorkload, typer.Option("--workload")] = "chat",
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", min=1, help="Repeatable (1, 4, 16).")
    ] = None,
    num_requests: Annotated[int, typer.Option("--num-requests", min=1, help="Per level.")] = 32,
    duration: Annotated[
        str | None, typer.Option("--duration", help="Per level instead: 60, 90s, 5m.")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Uncounted, per level.")] = 2,
    ttft_slo: Annotated[float, typer.Option("--ttft-slo", help="Seconds.")] = 2.0,
    tpot_slo: Annotated[float, typer.Option("--tpot-slo", help="Seconds.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1)] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos/--no-ignore-eos", help=EOS_HELP)] = True,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help=LEN_HELP)] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="ENDURO_API_KEY")] = None,
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", min=1.0)] = 600.0,
) -> None:
    """Load an OpenAI-compatible server at several concurrencies; write JSON, markdown, PNGs."""
    try:
        options = ServeBenchOptions(
            url=url,
            out_dir=out,
            label=label,
            api_key=api_key,
            model=model,
            workload=workload,
            concurrencies=tuple(concurrency) if concurrency else ServeBenchOptions.concurrencies,
            num_requests=num_requests,
            duration=parse_duration(duration) if duration is not None else None,
            num_warmup=warmup,
            ttft_slo=ttft_slo,
            tpot_slo=tpot_slo,
            seed=seed,
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            stream=stream,
            max_model_len=max_model_len,
            ready_timeout=ready_timeout,
            command_line=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    console = Console()
    try:
        result = asyncio.run(run_serve_bench(options))
    except SoakError as error:
        console.print(f"[red]bench serve: {error}[/red]")
        raise typer.Exit(2) from error
    console.print(Markdown(run_markdown(result)))


def bench_compare_command(
    results: Annotated[list[Path], typer.Argument(help="Result JSONs of `enduro bench serve`.")],
    baseline: Annotated[str, typer.Option("--baseline", help="The label ratios are against.")],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for compare.md, compare.png.")
    ] = OUT,
) -> None:
    """Merge several runs into one table of ratios against a baseline run."""
    try:
        markdown = compare_results(results, baseline, out)
    except (ValueError, OSError, KeyError, TypeError) as error:  # unreadable or foreign files
        raise typer.BadParameter(str(error)) from error
    Console().print(Markdown(markdown))
