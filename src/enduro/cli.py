"""`enduro serve | generate | bench | soak | doctor` — the command line."""

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from enduro.bench.serve_command import bench_compare_command, bench_serve_command
from enduro.bench.soak import soak_command
from enduro.config import (
    DTYPES,
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    GuardConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from enduro.config_flags import config_parameters, split_by_class
from enduro.guard.doctor import doctor_command

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures, never assertions).")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

MODEL_HELP = "A .gguf file or HF directory (default: Gemma 3 270M)."
DTYPE_HELP = f"One of {', '.join(DTYPES)}."


@contextmanager
def load_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar for model loading, fed by the loader's (stage, done, total) callback."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
) -> None:
    """Continue PROMPT, streaming tokens to the terminal as they are generated."""
    from enduro.engine.llm import LLM
    from enduro.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with load_progress() as report:
        llm = LLM(model, progress=report, dtype=dtype)
    console.print(f"[dim]model loaded in {llm.engine.runner.load_seconds:.1f} s[/dim]")
    sys.stdout.write(prompt)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def serve(**values: Any) -> None:
    """Serve the OpenAI-compatible HTTP API; the engine runs in its own process."""
    model, cache, scheduler, server, guard = split_by_class(values, *SERVE_CONFIGS)
    try:
        engine_config = EngineConfig(
            ModelConfig(**model), CacheConfig(**cache), SchedulerConfig(**scheduler)
        )
        server_config = ServerConfig(**server)
        guard_config = GuardConfig(**guard)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    from enduro.server.launcher import run_server

    run_server(engine_config, server_config, guard_config)


SERVE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ServerConfig, GuardConfig)
serve.__signature__ = inspect.Signature(config_parameters(*SERVE_CONFIGS))  # type: ignore[attr-defined]
app.command("serve")(serve)


app.command("soak")(soak_command)
app.command("doctor")(doctor_command)
bench_app.command("serve")(bench_serve_command)
bench_app.command("compare")(bench_compare_command)


@bench_app.command("offline")
def bench_offline(
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 128,
    concurrency: Annotated[list[int] | None, typer.Option("--concurrency")] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run transformers.")
    ] = True,
    quantization: Annotated[
        str, typer.Option("--quantization", help="The engine's --quantization.")
    ] = "none",
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="The engine's --compile.")
    ] = False,
) -> None:
    """Decode tokens/s of the engine alone, next to transformers `generate` in the same run."""
    from enduro.bench.offline import run_offline_benchmark

    with load_progress() as report:
        table = run_offline_benchmark(
            model,
            dtype,
            max_tokens,
            concurrency or [1, 16],
            baseline,
            report,
            quantization=quantization,
            compile=compile,
        )
    Console().print(table)


@bench_app.command("quantization")
def bench_quantization(
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    setting: Annotated[
        list[str] | None, typer.Option("--setting", help="Default: every --quantization value.")
    ] = None,
    streams: Annotated[list[int] | None, typer.Option("--streams")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 64,
) -> None:
    """Decode tokens/s and perplexity on a fixed text of each quantization setting, one run."""
    from enduro.bench.quantization import quantization_table, run_quantization_benchmark

    settings = setting or list(QUANTIZATIONS)
    with load_progress() as report:
        results = run_quantization_benchmark(
            model, settings, streams or [1, 16], max_tokens, dtype, progress=report
        )
    Console().print(quantization_table(results, max_tokens))


if __name__ == "__main__":
    app()
