"""`enduro generate | bench` — the command line."""

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from enduro.config import DTYPES

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures, never assertions).")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

ModelOption = typer.Option(None, "--model", help="A .gguf file or HF directory (default: Gemma 3 270M).")
DtypeOption = typer.Option("auto", "--dtype", help=f"One of {', '.join(DTYPES)}.")


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
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: str | None = ModelOption,
    max_tokens: int = typer.Option(64, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    dtype: str = DtypeOption,
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


@bench_app.command("offline")
def bench_offline(
    model: str | None = ModelOption,
    dtype: str = DtypeOption,
    max_tokens: int = typer.Option(128, "--max-tokens", min=1),
    concurrency: list[int] = typer.Option([1, 16], "--concurrency"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also run transformers."),
) -> None:
    """Decode tokens/s of the engine alone, next to transformers `generate` in the same run."""
    from enduro.bench.offline import run_offline_benchmark

    with load_progress() as report:
        table = run_offline_benchmark(model, dtype, max_tokens, concurrency, baseline, report)
    Console().print(table)


if __name__ == "__main__":
    app()
