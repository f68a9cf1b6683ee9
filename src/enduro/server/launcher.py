"""`enduro serve`: start the engine process, then the HTTP API in front of it.

SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections and wait up to
`shutdown_timeout` for in-flight requests; then the engine process is shut down, so no child
outlives the server, and the process exits 0.
"""

import asyncio
import contextlib
import logging
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from enduro.config import EngineConfig, ServerConfig
from enduro.server.app import create_app
from enduro.server.engine_client import EngineClient
from enduro.tokenizer import Tokenizer

API_KEY_ENV = "ENDURO_API_KEY"
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


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    asyncio.run(serve(engine_config, server_config))


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    config = replace(server_config, api_key=server_config.api_key or os.environ.get(API_KEY_ENV))
    engine = EngineClient(engine_config)
    await engine.start()
    try:
        info = engine.model_info
        if info.tokenizer_dir is None:
            raise SystemExit(f"{info.source}: the model has no tokenizer; the HTTP API needs one")
        app = create_app(engine, Tokenizer(Path(info.tokenizer_dir)), info, config)
        server = DrainingServer(
            app,
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                timeout_graceful_shutdown=math.ceil(config.shutdown_timeout),
                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                server_header=False,
                log_level="info",
            ),
        )
        await server.serve()
    finally:
        await engine.shutdown()
