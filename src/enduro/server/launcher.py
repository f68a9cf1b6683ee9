"""`enduro serve`: start the engine process, then the HTTP API in front of it.

SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections and wait up to
`shutdown_timeout` for in-flight requests; then the engine process is shut down, so no child
outlives the server, and the process exits 0.

Logs go to stderr in --log-format, the engine's and uvicorn's included; our own request lines
replace uvicorn's access log. With --metrics-port the same server listens there too and
answers /metrics only (no API key); it stops listening when a drain begins, with the API port.
"""

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from enduro.config import EngineConfig, GuardConfig, ServerConfig
from enduro.guard.introspection import collect_and_trim
from enduro.observability.logging import configure_logging
from enduro.server.app import create_app
from enduro.server.engine_client import EngineClient
from enduro.server.routes_metrics import metrics_app
from enduro.tokenizer import Tokenizer

# The app answers 431 with an error envelope above 16 KiB of headers; beyond this the HTTP
# parser itself drops the connection, before anything is buffered further.
MAX_HEADER_BYTES = 64 * 1024

log = logging.getLogger("enduro.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains and the process then exits 0.

    uvicorn re-raises a captured SIGTERM once it has shut down, which ends the process with
    the signal's status; a drained, orderly shutdown should report success instead.
    """

    def __init__(self, app: FastAPI, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True  # /ready turns 503 and new requests are refused
        super().handle_exit(sig, frame)


class ByPort:
    """One server, two listeners: requests that arrive on `metrics_port` go to the metrics
    app, everything else (the lifespan included) to the API."""

    def __init__(self, api: ASGIApp, metrics: ASGIApp, metrics_port: int) -> None:
        self.api, self.metrics, self.metrics_port = api, metrics, metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")  # (host, port) of the listener that accepted it
        if scope["type"] == "http" and server is not None and server[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def listen(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise SystemExit(f"cannot listen on {host}:{port}: {e}") from e


def run_server(
    engine_config: EngineConfig, server_config: ServerConfig, guard_config: GuardConfig
) -> None:
    asyncio.run(serve(engine_config, server_config, guard_config))


async def serve(
    engine_config: EngineConfig, config: ServerConfig, guard_config: GuardConfig
) -> None:
    # The API key from ENDURO_API_KEY is resolved where it is enforced (create_app).
    configure_logging(config.log_format, role="api")
    # With a metrics port both listeners are bound here, before the engine loads, so a busy
    # port fails at once; without one uvicorn binds the API port itself.
    sockets = None
    if config.metrics_port is not None:
        sockets = [listen(config.host, config.port), listen(config.host, config.metrics_port)]
    try:
        engine = EngineClient(
            engine_config,
            log_format=config.log_format,
            trace_memory=guard_config.tracemalloc,
            allocator=config.engine_allocator,
        )
    except ValueError as e:  # jemalloc asked for but not installed
        raise SystemExit(str(e)) from e
    await engine.start()
    try:
        info = engine.model_info
        if info.tokenizer_dir is None:
            raise SystemExit(f"{info.source}: the model has no tokenizer; the HTTP API needs one")
        tokenizer = Tokenizer(Path(info.tokenizer_dir))
        app = create_app(engine, tokenizer, info, config, guard_config=guard_config)
        # Parsing the tokenizer (a 33 MB JSON for the default model) leaves ~300 MB freed
        # but kept by glibc: give it back before serving.
        collect_and_trim()
        telemetry = app.state.context.telemetry
        asgi_app: ASGIApp = app
        if config.metrics_port is not None:
            asgi_app = ByPort(app, metrics_app(telemetry.registry), config.metrics_port)
        server = DrainingServer(
            app,
            uvicorn.Config(
                asgi_app,
                host=config.host,
                port=config.port,
                timeout_graceful_shutdown=math.ceil(config.shutdown_timeout),
                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                server_header=False,
                log_level="info",
                log_config=None,  # the root handler configure_logging set up
                access_log=False,  # the request lines (observability/logging.py) replace it
            ),
        )
        if sockets is not None:
            log.info(
                "serving on http://%s:%d, metrics also on http://%s:%d/metrics",
                *(config.host, config.port, config.host, config.metrics_port),
            )
        try:
            await server.serve(sockets=sockets)
        finally:
            telemetry.shutdown()  # flush batched spans
    finally:
        for sock in sockets or []:
            sock.close()
        await engine.shutdown()
