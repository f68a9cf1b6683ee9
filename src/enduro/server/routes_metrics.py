"""GET /metrics: the Prometheus exposition of the server's registry.

On the API port it sits behind the API key like every other route; `--metrics-port` adds a
listener of its own that serves only /metrics, for scrapers that should not hold the key.
The text format by default, OpenMetrics when the scraper asks for it in Accept.
"""

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from enduro.server.context import Context

router = APIRouter()


def metrics_response(registry: CollectorRegistry, accept: str | None) -> Response:
    encode, content_type = choose_encoder(accept or "")
    return Response(encode(registry), media_type=content_type)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, context: Context) -> Response:
    return metrics_response(context.telemetry.registry, request.headers.get("accept"))


def metrics_app(registry: CollectorRegistry) -> Starlette:
    """The --metrics-port listener: /metrics only, no key, 404 elsewhere."""

    async def serve_metrics(request: Request) -> Response:
        return metrics_response(registry, request.headers.get("accept"))

    return Starlette(routes=[Route("/metrics", serve_metrics, methods=["GET"])])
