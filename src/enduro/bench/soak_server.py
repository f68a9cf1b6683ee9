"""The server a soak loads: `enduro serve` started as a subprocess (or a given URL), readiness,
and the served model's card."""

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from enduro.bench.http_client import OpenAIClient


class SoakError(RuntimeError):
    """The soak could not run: the server did not come up or answer."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def server_for(
    url: str | None, serve_args: Sequence[str], log_path: Path, stop_timeout: float
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes] | None]]:
    """`url`, or that of an `enduro serve` started with `serve_args` on a free loopback port;
    with the process (None for a given URL). Its output goes to `log_path`; at the end SIGTERM
    stops it (it drains), SIGKILL if it has not exited after `stop_timeout` seconds."""
    if url is not None:
        yield url, None
        return
    port = free_port()
    command = [sys.executable, "-m", "enduro.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), *serve_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


async def wait_ready(
    client: OpenAIClient, timeout: float, process: subprocess.Popen[bytes] | None, show: bool
) -> None:
    """Polls GET /ready until it answers 200; raises SoakError on timeout or if the server
    process exits first. A server without /ready (404, e.g. llama-server) is polled on GET
    /health instead: it answers 200 once the model is loaded."""
    started = time.monotonic()
    path = "/ready"
    columns = (TextColumn("{task.description}"), TimeElapsedColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not show) as progress:
        progress.add_task("waiting for the server to be ready", total=None)
        while time.monotonic() - started < timeout:
            if process is not None and process.poll() is not None:
                raise SoakError(f"enduro serve exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                status = (await client.http.get(path)).status_code
                if status == 200:
                    return
                path = "/health" if status == 404 else path
            await asyncio.sleep(0.5)
    raise SoakError(f"the server was not ready after {timeout:.0f} s")


async def model_card(client: OpenAIClient) -> dict[str, Any]:
    """The first entry of GET /v1/models (empty if there is none)."""
    try:
        response = await client.http.get("/v1/models")
        response.raise_for_status()
        data = response.json().get("data") or [{}]
    except (httpx.HTTPError, ValueError) as error:
        raise SoakError(f"GET /v1/models failed: {error}") from error
    card: dict[str, Any] = data[0]
    return card
