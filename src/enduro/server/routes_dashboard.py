"""GET /dashboard: a live page of the last hour's latency, throughput, memory and KV usage.

The page, its script and styles and the vendored uPlot are files under
observability/dashboard/, served from /dashboard/static/; the page polls /dashboard/data, the
DashboardSampler's ring buffer as JSON. Nothing comes from another origin (the page's CSP is
`default-src 'self'`). The API key applies here as on every other route, and none of these
routes is part of the OpenAPI schema.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from enduro.observability.timeseries import DEFAULT_INTERVAL, DashboardSampler, Registry

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "observability" / "dashboard"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'", "Cache-Control": "no-cache"}


@asynccontextmanager
async def sampling(app: FastAPI) -> AsyncIterator[None]:
    """Samples while the app runs; the sampler is read from app.state when the app starts."""
    sampler: DashboardSampler = app.state.dashboard
    sampler.start()
    try:
        yield
    finally:
        await sampler.stop()


router = APIRouter(include_in_schema=False, lifespan=sampling)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/dashboard/data")
async def dashboard_data(request: Request) -> JSONResponse:
    sampler: DashboardSampler = request.app.state.dashboard
    return JSONResponse(sampler.to_json(), headers={"Cache-Control": "no-store"})


def install_dashboard(app: FastAPI, registry: Registry, interval: float = DEFAULT_INTERVAL) -> None:
    """Serve the dashboard from `app` and sample `registry` every `interval` seconds during the
    app's lifespan."""
    app.state.dashboard = DashboardSampler(registry, interval)
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard-static")
