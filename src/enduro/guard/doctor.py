"""`enduro doctor` — a readable health report of a running server, as Markdown and PNG.

Reads the server's /debug endpoints once, keeps the JSON as served in a `DoctorReport`, and
writes report.md with memory.png, pool.png and latency.png beside it. Any endpoint may be
missing (an older server, the guard off) or lack fields: its section then says "not
available" and the rest of the report is still written.
"""

import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from enduro.guard.doctor_report import (
    TOP_ROWS,
    TRACE_FILE,
    DoctorReport,
    human_duration,
    render_markdown,
)

TIMEOUT = 10.0
PROFILE_TIMEOUT = 60.0
"""Profiling runs engine steps (and writes a trace): seconds, not milliseconds."""
console = Console(stderr=True)


class DoctorError(Exception):
    """The server cannot be read at all (unreachable, or it refuses the API key)."""


# ---- reading the server ------------------------------------------------------------------


def fetch_report(client: httpx.Client, profile_steps: int, trace: bool) -> DoctorReport:
    """Read every endpoint through `client` (its base URL is the server's)."""
    health = _read_health(client)
    return DoctorReport(
        url=_url(client),
        time=time.time(),
        health=health,
        version=_get_json(client, "GET", "/version"),
        guard=_get_json(client, "GET", "/debug/guard"),
        events=_get_json(client, "GET", "/debug/events"),
        pool=_get_json(client, "GET", "/debug/pool"),
        memory=_get_json(client, "GET", "/debug/memory", params={"top": TOP_ROWS}),
        profile=_get_json(
            client,
            "POST",
            "/debug/profile",
            json={"num_steps": profile_steps, "trace": trace},
            timeout=PROFILE_TIMEOUT,
        ),
    )


def _read_health(client: httpx.Client) -> str:
    try:
        response = client.get("/health")
    except httpx.TransportError as error:
        raise DoctorError(f"cannot reach the server at {_url(client)}: {error}") from error
    if response.status_code != 200:
        return f"unhealthy (HTTP {response.status_code})"
    restarts = _json_or_none(response) or {}
    return f"ok (engine restarts: {restarts.get('engine_restarts', 0)})"


def _get_json(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any | None:
    """The endpoint's JSON, or None when it is not there or failed: one missing section must
    not cost the whole report. A refused API key fails every section, so it is fatal."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        return None
    except httpx.TransportError as error:
        raise DoctorError(f"lost the server at {_url(client)}: {error}") from error
    if response.status_code == 401:
        raise DoctorError("the server wants an API key: pass --api-key or set ENDURO_API_KEY")
    return _json_or_none(response) if response.status_code == 200 else None


def _url(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/")  # httpx adds a slash to base URLs


def _json_or_none(response: httpx.Response) -> Any | None:
    try:
        return response.json()
    except ValueError:
        return None


# ---- writing the report ------------------------------------------------------------------


def write_report(report: DoctorReport, out: Path) -> Path:
    """Write report.md, its PNGs and (when traced) engine-trace.json into `out`."""
    # matplotlib takes about a second to import: only `enduro doctor` pays for it.
    from enduro.guard import doctor_plots

    out.mkdir(parents=True, exist_ok=True)
    samples, guard, pool = report.samples, report.guard or {}, report.pool
    if samples:
        limit, forecast = guard.get("memory_limit_bytes"), guard.get("forecast_seconds")
        label = "forecast" if forecast is None else f"forecast: limit in {human_duration(forecast)}"
        doctor_plots.plot_memory(
            samples, report.event_list, limit, forecast, label, out / "memory.png"
        )
        doctor_plots.plot_latency(samples, out / "latency.png")
    if pool and pool.get("segments"):
        blocks = pool.get("segment_blocks", 0)
        doctor_plots.plot_pool(pool["segments"], blocks, out / "pool.png")
    if report.trace is not None:
        (out / TRACE_FILE).write_text(json.dumps(report.trace))
    path = out / "report.md"
    path.write_text(render_markdown(report))
    return path


def doctor_command(
    url: Annotated[
        str, typer.Option("--url", help="Base URL of the running server.")
    ] = "http://127.0.0.1:8000",
    out: Annotated[
        Path, typer.Option("--out", help="Directory for report.md and its PNGs.")
    ] = Path("doctor-report"),
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="ENDURO_API_KEY", help="The server's API key."),
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace", help=f"Also save a Chrome trace as {TRACE_FILE}.")
    ] = False,
    profile_steps: Annotated[
        int, typer.Option("--profile-steps", min=1, help="Engine steps to profile.")
    ] = 8,
) -> None:
    """Write a health report of a running server (Markdown and PNG) from its /debug endpoints."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT) as client:
            report = fetch_report(client, profile_steps, trace)
    except (DoctorError, httpx.InvalidURL) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(1) from error
    path = write_report(report, out)
    console.print(f"report written to [bold]{escape(str(path))}[/bold]", soft_wrap=True)
