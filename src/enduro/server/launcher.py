"""`enduro serve`: start the engine process, then the HTTP API in front of it.

SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections and wait up to
`shutdown_timeout` for in-flight requests; then the engine process is shut down, so no child
outlives the server, and the process exits 0.
"""

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

import uvicorn

from enduro.config import EngineConfig, ServerConfig
from enduro.server.app import create_app
from enduro.server.engine_client import EngineClient
from enduro.tokenizer import Tokenizer

API_KEY_ENV = "ENDURO_API_KEY"
# Request headers beyond this many bytes are refused by the HTTP parser itself.
MAX_HEADER_BYTES = 16 * 1024

log = logging.getLogger("enduro.server")


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
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                timeout_graceful_shutdown=config.shutdown_timeout,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                server_header=False,
                log_level="info",
            )
        )
        await server.serve()
    finally:
        await engine.shutdown()
