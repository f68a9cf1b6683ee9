"""The report `enduro doctor` writes: what it read from the server (`DoctorReport`) and
its rendering as Markdown, section by section, with human units."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TOP_ROWS = 15
"""Rows in the allocation and gc growth tables."""
MAX_EVENTS = 30
PROCESSES = ("api", "engine")
TRACE_FILE = "engine-trace.json"
TRACEMALLOC_OFF = (
    "Allocation tracing is off: start the server with --tracemalloc to see where Python "
    "memory grows."
)


@dataclass(frozen=True)
class DoctorReport:
    """What one doctor run read from the server. A section is None when its endpoint did not
    answer with JSON (404, error, timeout); the JSON is kept as served."""

    url: str
    time: float
    health: str
    version: dict[str, Any] | None
    guard: dict[str, Any] | None
    events: dict[str, Any] | None
    pool: dict[str, Any] | None
    memory: dict[str, Any] | None
    profile: dict[str, Any] | None

    @property
    def samples(self) -> list[dict[str, Any]]:
        return list((self.guard or {}).get("samples") or [])

    @property
    def event_list(self) -> list[dict[str, Any]]:
        return list((self.events or {}).get("data") or [])

    @property
    def trace(self) -> Any | None:
        return (self.profile or {}).get("trace")


def render_markdown(report: DoctorReport) -> str:
    sections = [
        _header(report),
        _memory_section(report),
        _allocation_section(report.memory),
        _gc_section(report.memory),
        _pool_section(report.pool, report.samples),
        _events_section(report.events, report.event_list),
        _profile_section(report.profile),
        _latency_section(report.guard, report.samples),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _header(report: DoctorReport) -> list[str]:
    guard = report.guard or {}
    mode = str(guard.get("mode", "not available"))
    if guard.get("interval"):
        mode += f", a sample every {human_duration(guard['interval'])}"
    return [
        "# enduro doctor",
        "",
        f"- Server: {report.url}",
        f"- Version: {(report.version or {}).get('version', 'not available')}",
        f"- Time: {_time(report.time)} UTC",
        f"- Guard: {mode}",
        f"- Health: {report.health}",
    ]


def _memory_section(report: DoctorReport) -> list[str]:
    lines = ["## Memory trend and forecast", ""]
    if report.guard is None:
        return [*lines, "/debug/guard: not available."]
    latest = report.samples[-1] if report.samples else {}
    if latest:
        lines += ["![memory](memory.png)", ""]
    leaks = report.guard.get("leak") or {}
    for process in PROCESSES:
        now = latest.get(f"{process}_memory_bytes")
        now_text = "memory not available" if now is None else f"{_bytes(now)} now"
        lines.append(f"- **{process}**: {now_text}; {_slope(leaks.get(process))}")
    limit = report.guard.get("memory_limit_bytes")
    lines.append(f"- **memory limit**: {_limit(limit, report.guard.get('forecast_seconds'))}")
    return lines


def _slope(slope: dict[str, Any] | None) -> str:
    if slope is None:
        return "no trend yet"
    rate, low, high = (
        f"{_signed_bytes(slope.get(key) or 0)}/h" for key in ("slope_bytes_per_hour", "low", "high")
    )
    text = f"{rate} (CI {low} to {high}, p = {slope.get('p_value', 1):.2g})"
    if slope.get("bytes_per_request") is not None:
        text += f"; {_bytes(slope['bytes_per_request'])} per request"
    return f"{text}; {slope.get('num_points', 0)} points"


def _limit(limit: int | None, forecast_seconds: float | None) -> str:
    if limit is None:
        return "not available"
    if forecast_seconds is None:
        return f"{_bytes(limit)} (api + engine), not reached at the current trend"
    return f"{_bytes(limit)} (api + engine), reached in {human_duration(forecast_seconds)}"


def _allocation_section(memory: dict[str, Any] | None) -> list[str]:
    lines = ["## Top Python allocation growth", ""]
    if memory is None:
        return [*lines, "/debug/memory: not available."]
    traced = {process: (memory.get(process) or {}).get("tracemalloc") for process in PROCESSES}
    if all(rows is None for rows in traced.values()):
        return [*lines, TRACEMALLOC_OFF]
    for process, rows in traced.items():
        lines += [f"### {process}", ""]
        if rows is None:
            lines += ["Not traced.", ""]
            continue
        top = sorted(rows, key=lambda row: row.get("size_diff", 0), reverse=True)[:TOP_ROWS]
        header = ["Where", "Size", "Growth", "New blocks"]
        lines += [*_table(header, [_allocation_row(row) for row in top]), ""]
    return lines[:-1]


def _allocation_row(row: dict[str, Any]) -> list[str]:
    return [
        row.get("where", "?"),
        _bytes(row.get("size_bytes", 0)),
        _signed_bytes(row.get("size_diff", 0)),
        _signed_count(row.get("count_diff", 0)),
    ]


def _gc_section(memory: dict[str, Any] | None) -> list[str]:
    lines = ["## Object growth by type (gc)", ""]
    if memory is None:
        return [*lines, "/debug/memory: not available."]
    for process in PROCESSES:
        types = (memory.get(process) or {}).get("gc_types") or []
        top = sorted(types, key=lambda row: row.get("delta", 0), reverse=True)[:TOP_ROWS]
        rows = [
            [row.get("type", "?"), str(row.get("count", 0)), _signed_count(row.get("delta", 0))]
            for row in top
        ]
        lines += [f"### {process}", "", *_table(["Type", "Count", "Growth"], rows), ""]
    return lines[:-1]


def _pool_section(pool: dict[str, Any] | None, samples: list[dict[str, Any]]) -> list[str]:
    lines = ["## KV pool", ""]
    if pool is None:
        return [*lines, "/debug/pool: not available."]
    segment_bytes = (pool.get("bytes_per_block") or 0) * (pool.get("segment_blocks") or 0)
    lines += [
        f"- Segments: {_field(pool, 'num_segments')} of {_field(pool, 'max_num_segments')} "
        f"allocated, {_field(pool, 'segment_blocks')} blocks of {_field(pool, 'block_size')} "
        f"tokens each ({_bytes(segment_bytes)} per segment)",
        f"- Blocks: {_field(pool, 'num_used_blocks')} used, "
        f"{_field(pool, 'num_cached_blocks')} cached, {_field(pool, 'num_free_blocks')} free",
        f"- Fragmentation: {pool.get('fragmentation') or 0:.2f}",
    ]
    if samples:
        violations = samples[-1].get("pool_violations") or []
        lines.append(f"- Invariants: {'; '.join(violations) or 'all hold'}")
    segments = [segment for segment in pool.get("segments") or [] if segment.get("allocated")]
    if pool.get("segments"):
        lines += ["", "![KV pool](pool.png)"]
    rows = [_segment_row(segment) for segment in segments]
    return [*lines, "", *_table(["Segment", "Used", "Cached", "Free", "Idle"], rows)]


def _segment_row(segment: dict[str, Any]) -> list[str]:
    idle = segment.get("idle_seconds")
    counts = [_field(segment, key) for key in ("index", "num_used", "num_cached", "num_free")]
    return [*counts, "-" if idle is None else human_duration(idle)]


def _events_section(events: dict[str, Any] | None, data: list[dict[str, Any]]) -> list[str]:
    lines = [f"## Recent alerts and actions (last {MAX_EVENTS}, oldest first)", ""]
    if events is None:
        return [*lines, "/debug/events: not available."]
    if not data:
        return [*lines, "No alerts or actions."]
    header = ["Time (UTC)", "Kind", "Severity", "Name", "Process", "Message"]
    rows = [_event_row(event) for event in data[-MAX_EVENTS:]]
    return [*lines, *_table(header, rows, figures=False)]


def _event_row(event: dict[str, Any]) -> list[str]:
    fields = (event.get(key) or "-" for key in ("kind", "severity", "name", "process", "message"))
    return [_time(event.get("time", 0)), *map(str, fields)]


def _profile_section(profile: dict[str, Any] | None) -> list[str]:
    lines = ["## Engine step profile", ""]
    if profile is None:
        return [*lines, "/debug/profile: not available."]
    lines.append(f"{profile.get('num_steps')} engine steps profiled.")
    if profile.get("trace") is not None:
        lines.append(f"Chrome trace: [{TRACE_FILE}]({TRACE_FILE}) (open in ui.perfetto.dev).")
    return [*lines, "", "```text", str(profile.get("summary", "")).rstrip(), "```"]


def _latency_section(guard: dict[str, Any] | None, samples: list[dict[str, Any]]) -> list[str]:
    lines = ["## Latency (latest interval with finished requests)", ""]
    if guard is None:
        return [*lines, "/debug/guard: not available."]
    if not samples:
        return [*lines, "No samples yet."]
    rows = [
        [label, *(_latest_seconds(samples, f"{name}_{q}") for q in ("p50", "p99"))]
        for label, name in (("TTFT", "ttft"), ("TPOT", "tpot"))
    ]
    step = _latest_seconds(samples, "step_seconds_mean")
    lines += [*_table(["", "p50", "p99"], rows), "", f"Engine step: {step} mean."]
    return [*lines, "", "![latency](latency.png)"]


def _latest_seconds(samples: list[dict[str, Any]], key: str) -> str:
    """The latest reading of `key`: an idle last interval has none, and says nothing."""
    values = [sample[key] for sample in samples if sample.get(key) is not None]
    return _seconds(values[-1]) if values else "-"


# ---- formatting ----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], figures: bool = True) -> list[str]:
    """A Markdown table; the first column left-aligned, the others right-aligned when they
    hold `figures`."""
    if not rows:
        return ["(none)"]
    align = ["---"] + ["---:" if figures else "---"] * (len(header) - 1)
    cells = [header, align, *rows]
    return ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in cells]


def _field(data: dict[str, Any], key: str) -> str:
    """A figure the server may leave out: "?" when it did."""
    value = data.get(key)
    return "?" if value is None else str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _signed_bytes(size: float) -> str:
    return ("+" if size > 0 else "") + _bytes(size)


def _signed_count(count: float) -> str:
    return f"{int(count):+d}"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


# ---- the command -----------------------------------------------------------------------------
