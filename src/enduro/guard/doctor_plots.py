"""The PNGs of `enduro doctor`: memory over time, the KV pool map, latency over time.

matplotlib's object API only (a `Figure` saved through the Agg canvas): no pyplot, so no
global figure state and no display. Inputs are the JSON the server's /debug endpoints serve;
a figure the server did not report is None and leaves a gap in its line.
"""

import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MIB = float(1 << 20)
FORECAST_SPAN_RATIO = 3.0
"""The forecast line reaches at most this many times the sampled span into the future, so a
limit days away does not squash the measured part of the chart to a sliver."""
EVENT_COLORS = {"alert": "tab:red", "action": "tab:blue"}
DPI = 100


def plot_memory(
    samples: list[dict[str, Any]],
    events: list[dict[str, Any]],
    limit_bytes: int | None,
    forecast_seconds: float | None,
    forecast_label: str,
    path: Path,
) -> None:
    """API, engine and total memory (MiB) against minutes from the latest sample; alerts and
    actions as vertical lines; a dashed forecast of the total towards the memory limit, in
    the legend as `forecast_label`."""
    figure = Figure(figsize=(9, 4.5))
    axes = figure.add_subplot()
    now = samples[-1]["time"]
    minutes = [(sample["time"] - now) / 60 for sample in samples]
    api = _series(samples, "api_memory_bytes", MIB)
    engine = _series(samples, "engine_memory_bytes", MIB)
    total = [a + e for a, e in zip(api, engine, strict=True)]  # NaN unless both were read
    axes.plot(minutes, api, label="api", color="tab:green")
    axes.plot(minutes, engine, label="engine", color="tab:purple")
    axes.plot(minutes, total, label="api + engine", color="black", linewidth=1)
    _plot_events(axes, events, now, minutes[0])
    if limit_bytes is not None and forecast_seconds is not None and not math.isnan(total[-1]):
        forecast = (total[-1], limit_bytes / MIB, forecast_seconds)
        _plot_forecast(axes, *forecast, -minutes[0], forecast_label)
    axes.set_xlabel("minutes from the latest sample")
    axes.set_ylabel("memory (MiB)")
    axes.set_ylim(bottom=0)
    axes.set_title("Memory")
    _legend_outside(axes)
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_pool(segments: list[dict[str, Any]], segment_blocks: int, path: Path) -> None:
    """One stacked bar per segment (used, cached, free blocks); unallocated segments are
    empty dashed outlines the height of a segment."""
    figure = Figure(figsize=(min(max(6.0, 0.15 * len(segments)), 20.0), 4))
    axes = figure.add_subplot()
    allocated = [segment for segment in segments if segment.get("allocated")]
    empty = [segment["index"] for segment in segments if not segment.get("allocated")]
    index = [segment["index"] for segment in allocated]
    bottom = [0.0] * len(allocated)
    for key, color in (("num_used", "tab:red"), ("num_cached", "tab:orange")):
        heights = [float(segment.get(key) or 0) for segment in allocated]
        axes.bar(index, heights, bottom=bottom, color=color, label=key.removeprefix("num_"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    free = [float(segment.get("num_free") or 0) for segment in allocated]
    axes.bar(index, free, bottom=bottom, color="tab:green", alpha=0.35, label="free")
    outline = [float(segment_blocks)] * len(empty)
    axes.bar(empty, outline, fill=False, edgecolor="grey", linestyle="--", label="not allocated")
    axes.set_xlabel("segment")
    axes.set_ylabel("blocks")
    axes.set_title("KV pool")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(axes)
    _save(figure, path)


def plot_latency(samples: list[dict[str, Any]], path: Path) -> None:
    """TTFT and TPOT p50/p99 (ms) per guard interval, on two panels: their scales differ
    by an order of magnitude."""
    figure = Figure(figsize=(9, 5.5))
    ttft_axes, tpot_axes = figure.subplots(2, 1, sharex=True)
    now = samples[-1]["time"]
    minutes = [(sample["time"] - now) / 60 for sample in samples]
    for axes, name in ((ttft_axes, "ttft"), (tpot_axes, "tpot")):
        for quantile in ("p50", "p99"):
            values = _series(samples, f"{name}_{quantile}", 1e-3)
            # Markers: intervals without finished requests are gaps, and a lone point between
            # two gaps would not show as a line.
            axes.plot(minutes, values, marker=".", label=quantile)
        axes.set_ylabel(f"{name.upper()} (ms)")
        axes.set_ylim(bottom=0)
        _legend_outside(axes)
        axes.grid(alpha=0.3)
    tpot_axes.set_xlabel("minutes from the latest sample")
    ttft_axes.set_title("Latency")
    _save(figure, path)


def _series(samples: list[dict[str, Any]], key: str, unit: float) -> list[float]:
    """`key` of every sample in `unit`; NaN where missing, which matplotlib draws as a gap."""
    values = (sample.get(key) for sample in samples)
    return [float("nan") if value is None else value / unit for value in values]


def _plot_events(axes: Axes, events: list[dict[str, Any]], now: float, start: float) -> None:
    labelled: set[str] = set()
    for event in events:
        kind = event.get("kind")
        minute = (event.get("time", now) - now) / 60
        if kind not in EVENT_COLORS or minute < start:
            continue
        label = None if kind in labelled else f"{kind}s"
        labelled.add(kind)
        axes.axvline(minute, color=EVENT_COLORS[kind], linestyle=":", alpha=0.7, label=label)


def _plot_forecast(
    axes: Axes,
    total: float,
    limit: float,
    forecast_seconds: float,
    span_minutes: float,
    label: str,
) -> None:
    """A dashed line from the latest total to the limit, cut short when the limit lies far
    beyond the sampled span."""
    forecast_minutes = forecast_seconds / 60
    if forecast_minutes <= 0 or limit <= total:
        return
    reach = min(forecast_minutes, FORECAST_SPAN_RATIO * max(span_minutes, 1.0))
    end = total + (limit - total) * reach / forecast_minutes
    axes.plot([0, reach], [total, end], linestyle="--", color="black", label=label)
    if reach == forecast_minutes:
        axes.axhline(limit, color="tab:red", linewidth=1, label="memory limit")


def _legend_outside(axes: Axes) -> None:
    """Right of the plot: inside, it hides the latest readings, which matter most."""
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
