"""The serving benchmark's results: one run as JSON, markdown and PNGs, and several runs (say
enduro and llama-server, same workload) merged into one table of ratios against a baseline.

Files of a run are named after its label, so runs of several servers can share a directory:
`<label>.json` (every figure, the options, the command line, the time), `<label>.md` (one row
per concurrency), `<label>_throughput.png` and `<label>_latency.png` (figures against
concurrency). PNGs use matplotlib's object API (`Figure`): no pyplot, no global figure state.
"""

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

MISSING = "–"


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level. Latencies are seconds over the requests that finished ok; rates
    are per second of the level's wall time."""

    concurrency: int
    num_ok: int
    num_failed: int  # any status but 200, connection errors, error frames mid-stream
    num_good: int  # ok and within both SLOs
    duration: float  # seconds from the first measured request sent to the last reply
    num_input_tokens: int | None  # from the server's usage; None: it reported none
    num_output_tokens: int
    ttft_p50: float | None  # None: no streamed reply with a token
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    requests_per_s: float  # requests that finished ok
    input_tokens_per_s: float | None
    output_tokens_per_s: float
    goodput: float  # requests per second that finished ok within both SLOs
    good_share: float  # num_good / all measured requests
    errors: list[str]  # the first few distinct failures, "status: text"


@dataclass(frozen=True)
class ServeBenchResult:
    label: str
    url: str
    model: str | None
    workload: str
    start_time: float  # unix seconds
    command_line: str
    options: dict[str, Any]  # the run's options, JSON-ready, without the API key
    levels: list[LevelResult]


Column = tuple[str, Callable[[LevelResult], str]]


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return MISSING if value is None else f"{value * scale:.{digits}f}"


def _pair(low: float | None, high: float | None, scale: float, digits: int = 1) -> str:
    return f"{_num(low, scale, digits)} / {_num(high, scale, digits)}"


RUN_COLUMNS: list[Column] = [
    ("concurrency", lambda level: str(level.concurrency)),
    ("ok", lambda level: str(level.num_ok)),
    ("failed", lambda level: str(level.num_failed)),
    ("req/s", lambda level: _num(level.requests_per_s, digits=2)),
    ("goodput req/s (share)", lambda level: f"{level.goodput:.2f} ({level.good_share:.0%})"),
    ("output tok/s", lambda level: _num(level.output_tokens_per_s)),
    ("input tok/s", lambda level: _num(level.input_tokens_per_s)),
    ("TTFT p50 / p99 ms", lambda level: _pair(level.ttft_p50, level.ttft_p99, 1e3)),
    ("TPOT p50 / p99 ms", lambda level: _pair(level.tpot_p50, level.tpot_p99, 1e3)),
    ("ITL p50 / p99 ms", lambda level: _pair(level.itl_p50, level.itl_p99, 1e3)),
    ("e2e p50 / p99 s", lambda level: _pair(level.e2e_p50, level.e2e_p99, 1.0, 2)),
]
# (header, LevelResult attribute, scale, digits) of the comparison table.
COMPARED: list[tuple[str, str, float, int]] = [
    ("output tok/s", "output_tokens_per_s", 1.0, 1),
    ("req/s", "requests_per_s", 1.0, 2),
    ("goodput req/s", "goodput", 1.0, 2),
    ("TTFT p50 ms", "ttft_p50", 1e3, 1),
    ("TTFT p99 ms", "ttft_p99", 1e3, 1),
    ("TPOT p50 ms", "tpot_p50", 1e3, 1),
    ("TPOT p99 ms", "tpot_p99", 1e3, 1),
    ("e2e p99 s", "e2e_p99", 1.0, 2),
]
# A panel: y label, then (series name, LevelResult attribute, scale) plotted against concurrency.
Panel = tuple[str, list[tuple[str, str, float]]]
THROUGHPUT_PANELS: list[Panel] = [
    ("tokens/s", [("output", "output_tokens_per_s", 1.0), ("input", "input_tokens_per_s", 1.0)]),
    ("requests/s", [("all ok", "requests_per_s", 1.0), ("goodput", "goodput", 1.0)]),
]
LATENCY_PANELS: list[Panel] = [
    ("TTFT (ms)", [("p50", "ttft_p50", 1e3), ("p99", "ttft_p99", 1e3)]),
    ("TPOT (ms)", [("p50", "tpot_p50", 1e3), ("p99", "tpot_p99", 1e3)]),
]
COMPARE_PANELS: list[Panel] = [
    ("output tokens/s", [("", "output_tokens_per_s", 1.0)]),
    ("goodput (req/s)", [("", "goodput", 1.0)]),
    ("TTFT p99 (ms)", [("", "ttft_p99", 1e3)]),
    ("TPOT p99 (ms)", [("", "tpot_p99", 1e3)]),
]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def run_markdown(result: ServeBenchResult) -> str:
    options = result.options
    when = datetime.fromtimestamp(result.start_time, UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [[cell(level) for _, cell in RUN_COLUMNS] for level in result.levels]
    command = f" Command: `{result.command_line}`" if result.command_line else ""
    lines = [
        f"# {result.label}: {result.workload} workload against {result.url}",
        "",
        f"Model `{result.model}`, started {when}. SLOs: TTFT ≤ {options['ttft_slo'] * 1e3:.0f} ms,"
        f" TPOT ≤ {options['tpot_slo'] * 1e3:.0f} ms.{command}",
        "",
        *_table([header for header, _ in RUN_COLUMNS], rows),
    ]
    return "\n".join(lines) + "\n"


def write_report(result: ServeBenchResult, out_dir: Path) -> str:
    """Writes the run's JSON, markdown and PNGs into `out_dir`; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = asdict(result)
    record["timestamp"] = datetime.fromtimestamp(result.start_time, UTC).isoformat()
    (out_dir / f"{result.label}.json").write_text(json.dumps(record, indent=2) + "\n")
    markdown = run_markdown(result)
    (out_dir / f"{result.label}.md").write_text(markdown)
    runs = {result.label: result.levels}
    _plot(out_dir / f"{result.label}_throughput.png", "Throughput", runs, THROUGHPUT_PANELS)
    _plot(out_dir / f"{result.label}_latency.png", "Latency", runs, LATENCY_PANELS)
    return markdown


def read_result(path: Path) -> ServeBenchResult:
    record = json.loads(path.read_text())
    record.pop("timestamp", None)  # derived from start_time
    levels = [LevelResult(**level) for level in record.pop("levels")]
    return ServeBenchResult(**record, levels=levels)


def _value(level: LevelResult, key: str, scale: float) -> float | None:
    value = getattr(level, key)
    return None if value is None else value * scale


def _plot(
    path: Path, title: str, runs: dict[str, list[LevelResult]], panels: Sequence[Panel]
) -> None:
    """One panel per entry against concurrency (log 2 axis: levels usually double or more)."""
    figure = Figure(figsize=(7, 1 + 2.6 * len(panels)))
    axes_list = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    ticks = sorted({level.concurrency for levels in runs.values() for level in levels})
    for axes, (ylabel, series) in zip(axes_list, panels, strict=True):
        for run_label, levels in runs.items():
            for name, key, scale in series:
                values = [_value(level, key, scale) for level in levels]
                y = [math.nan if value is None else value for value in values]
                label = name if len(runs) == 1 else f"{run_label} {name}".strip()
                axes.plot([level.concurrency for level in levels], y, marker="o", label=label)
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, labels=[str(tick) for tick in ticks])
        axes.minorticks_off()
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    axes_list[0].set_title(title)
    axes_list[-1].set_xlabel("concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _compared_cell(
    level: LevelResult, base: LevelResult | None, key: str, scale: float, digits: int
) -> str:
    """The figure and its ratio to the baseline's (`base`; None: no ratio, as in the
    baseline's own rows and at a concurrency the baseline did not run)."""
    value = getattr(level, key)
    text = _num(value, scale, digits)
    if base is None:
        return text
    base_value = getattr(base, key)
    if value is None or not base_value:
        return f"{text} ({MISSING})"
    return f"{text} ({value / base_value:.2f}×)"


def _compared_row(level: LevelResult, base: LevelResult | None) -> list[str]:
    return [_compared_cell(level, base, key, scale, digits) for _, key, scale, digits in COMPARED]


def compare_markdown(runs: Sequence[ServeBenchResult], baseline_label: str) -> str:
    """One row per (concurrency, run), baseline first; each figure with its ratio to the
    baseline's at the same concurrency."""
    by_label = {run.label: run for run in runs}
    ordered = [by_label[baseline_label]] + [run for run in runs if run.label != baseline_label]
    levels = {(run.label, level.concurrency): level for run in runs for level in run.levels}
    rows = []
    for concurrency in sorted({concurrency for _, concurrency in levels}):
        base = levels.get((baseline_label, concurrency))
        for run in ordered:
            if (level := levels.get((run.label, concurrency))) is not None:
                cells = _compared_row(level, None if level is base else base)
                rows.append([str(concurrency), run.label, *cells])
    header = ["concurrency", "server", *(name for name, *_ in COMPARED)]
    lines = [
        f"# {' vs '.join(run.label for run in ordered)}: {runs[0].workload} workload",
        "",
        f"Ratios: figure / {baseline_label}'s at the same concurrency (above 1: more throughput,"
        " or more latency).",
        "",
        *_table(header, rows),
    ]
    return "\n".join(lines) + "\n"


def compare_results(paths: Sequence[Path], baseline_label: str, out: Path) -> str:
    """Merges result JSONs into `out`/compare.md and compare.png; returns the markdown. The runs
    must have distinct labels and one workload, and one of them must be the baseline."""
    runs = [read_result(path) for path in paths]
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the runs' labels are not distinct: {labels}")
    if baseline_label not in labels:
        raise ValueError(f"no run is labelled {baseline_label!r} (labels: {labels})")
    if len({run.workload for run in runs}) != 1:
        raise ValueError("the runs are of different workloads: their figures do not compare")
    runs.sort(key=lambda run: run.label != baseline_label)  # the baseline first, in plots too
    markdown = compare_markdown(runs, baseline_label)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown)
    runs_levels = {run.label: run.levels for run in runs}
    _plot(out / "compare.png", "Comparison", runs_levels, COMPARE_PANELS)
    return markdown
