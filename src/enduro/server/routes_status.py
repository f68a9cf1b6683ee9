"""GET /v1/models, /health (liveness), /ready (readiness), /version."""

from fastapi import APIRouter, Request

from enduro import __version__
from enduro.server.context import Context
from enduro.server.errors import APIError
from enduro.server.protocol import (
    HealthResponse,
    ModelCard,
    ModelList,
    StatusResponse,
    VersionResponse,
    error_responses,
)
from enduro.server.routes_common import COMMON_ERRORS

router = APIRouter()

PROBE_RESPONSES = error_responses(*COMMON_ERRORS, 503)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(*COMMON_ERRORS))
async def list_models(context: Context) -> ModelList:
    card = ModelCard(
        id=context.served_model_name,
        created=context.created,
        max_model_len=context.context_limit,
    )
    return ModelList(data=[card])


@router.get("/health", response_model=HealthResponse, responses=PROBE_RESPONSES)
async def health(context: Context) -> HealthResponse:
    """200 while the engine is alive and making progress; 503 otherwise."""
    if not context.engine.is_healthy:
        raise APIError(503, "the engine is not healthy", code="unhealthy")
    return HealthResponse(engine_restarts=context.engine.num_restarts)


@router.get("/ready", response_model=StatusResponse, responses=PROBE_RESPONSES)
async def ready(request: Request, context: Context) -> StatusResponse:
    """200 when the model is loaded and warm and the server is not draining."""
    context.check_accepting(request)
    return StatusResponse()


@router.get("/version", response_model=VersionResponse, responses=error_responses(*COMMON_ERRORS))
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
