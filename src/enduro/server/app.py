"""The OpenAI-compatible HTTP API: `create_app(engine, tokenizer, model_info, config)`.

Middleware, outermost first: telemetry (the request's record → span, log line, metrics) →
request id (and last-resort 500) → header caps (431) → path normalisation and API key (401) →
body cap (413). Then FastAPI: pydantic validation (400), the routes, and the error handlers
that put every error in OpenAI's envelope.

Metrics live in one injected registry (a new one per app unless given): GET /metrics and the
dashboard read it as `app.state.context.telemetry.registry`.

`app.state.draining = True` (set by the SIGTERM handler) makes /ready and new generation
requests answer 503 while requests in flight finish.
"""

import os
import time
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from enduro import __version__
from enduro.chat_template import END_OF_TURN_TOKENS, ChatTemplate
from enduro.config import GuardConfig, ServerConfig
from enduro.guard.service import Guard
from enduro.observability.telemetry import Telemetry
from enduro.server import (
    routes_chat,
    routes_completions,
    routes_metrics,
    routes_status,
    routes_tokens,
)
from enduro.server.admission import Admission
from enduro.server.auth import AuthMiddleware
from enduro.server.context import Engine, ServerContext, model_names
from enduro.server.engine_client import ModelInfo
from enduro.server.errors import install_error_handlers
from enduro.server.middleware import (
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    RequestIdMiddleware,
    TelemetryMiddleware,
)
from enduro.server.routes_common import customize_openapi
from enduro.server.routes_dashboard import install_dashboard
from enduro.server.routes_debug import install_debug_routes
from enduro.tokenizer import Tokenizer

API_KEY_ENV = "ENDURO_API_KEY"


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_info: ModelInfo,
    config: ServerConfig,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any | None = None,
    guard_config: GuardConfig | None = None,
) -> FastAPI:
    """`registry` (default: a new one) receives every metric; `tracer_provider` (default: as
    the OTEL_* environment says) every span; `guard_config` (default: GuardConfig()) says
    what the guard does."""
    app = FastAPI(title="enduro", version=__version__, summary="OpenAI-compatible LLM server")
    context = build_context(
        engine,
        tokenizer,
        model_info,
        config,
        registry=registry,
        tracer_provider=tracer_provider,
        guard_config=guard_config,
    )
    app.state.context = context
    app.state.draining = False
    for module in (routes_completions, routes_chat, routes_tokens, routes_status, routes_metrics):
        app.include_router(module.router)
    # /debug/*, and the guard's sampling task during the app's lifespan.
    install_debug_routes(app)
    # Dashboard: /dashboard, /dashboard/data, and a sampler of the metrics registry that runs
    # during the app's lifespan.
    install_dashboard(app, context.telemetry.registry)
    install_error_handlers(app)
    customize_openapi(app)
    # add_middleware puts each new one outermost, so this is innermost-first.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=config.api_key or os.environ.get(API_KEY_ENV))
    app.add_middleware(HeaderLimitMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(TelemetryMiddleware, telemetry=context.telemetry)
    return app


def build_context(
    engine: Engine,
    tokenizer: Tokenizer,
    model_info: ModelInfo,
    config: ServerConfig,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any | None = None,
    guard_config: GuardConfig | None = None,
) -> ServerContext:
    served, accepted = model_names(model_info, config)
    build_labels = {
        "version": __version__,
        "model": served,
        "dtype": model_info.dtype,
        "block_size": str(model_info.block_size),
        "num_blocks": str(model_info.num_blocks),
        "max_model_len": str(model_info.max_model_len),
    }
    telemetry = Telemetry.create(
        engine,
        build_labels,
        log_prompts=config.log_prompts,
        registry=registry,
        tracer_provider=tracer_provider,
    )
    guard = Guard(guard_config or GuardConfig(), engine, telemetry.registry)
    telemetry.listeners.append(guard.sampler.observe)
    return ServerContext(
        engine=engine,
        tokenizer=tokenizer,
        model_info=model_info,
        config=config,
        chat_template=ChatTemplate(
            tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token
        ),
        chat_stop_token_ids=tuple(
            token_id
            for token_id in map(tokenizer.token_id, END_OF_TURN_TOKENS)
            if token_id is not None
        ),
        admission=Admission(config.max_queue, config.max_queued_tokens),
        telemetry=telemetry,
        guard=guard,
        served_model_name=served,
        accepted_model_names=accepted,
        created=int(time.time()),
    )
