"""/debug/*: what the guard sees and did, the KV pool map, memory growth, an engine profile,
and (only with --enable-fault-injection) planted faults. `enduro doctor` and `enduro soak`
read these. They need the API key like every route and are not part of the OpenAPI schema.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from enduro.guard.introspection import HeapBaseline
from enduro.guard.service import Guard
from enduro.server.context import Context
from enduro.server.engine_client import EngineCommandError
from enduro.server.errors import APIError

MAX_PROFILE_TIMEOUT = 120.0


@asynccontextmanager
async def guarding(app: FastAPI) -> AsyncIterator[None]:
    """Run the guard during the app's lifespan (unless --guard off)."""
    guard: Guard = app.state.context.guard
    app.state.heap_baseline = HeapBaseline(guard.config.tracemalloc)
    task = asyncio.create_task(guard.run()) if guard.enabled else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await guard.stop()


router = APIRouter(prefix="/debug", include_in_schema=False, lifespan=guarding)


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_steps: int = Field(8, ge=1, le=64)
    trace: bool = False


class FaultsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    leak_bytes_per_request: int = Field(0, ge=0, le=64 << 20)
    slow_step_seconds: float = Field(0.0, ge=0.0, le=10.0)
    leak_blocks_per_request: int = Field(0, ge=0, le=64)
    fragment: bool = False


class RemediateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(pattern="^(trim|collect|recycle)$")


@router.get("/events")
async def events(context: Context, limit: int = Query(200, ge=1, le=1000)) -> dict[str, Any]:
    data = [event.to_json() for event in context.guard.events.recent(limit)]
    return {"object": "list", "data": data}


@router.get("/guard")
async def guard_report(context: Context) -> dict[str, Any]:
    return context.guard.report()


@router.get("/pool")
async def pool(context: Context) -> dict[str, Any]:
    return await _engine_command(context, "pool", {})


@router.get("/memory")
async def memory(
    request: Request, context: Context, top: int = Query(20, ge=1, le=200)
) -> dict[str, Any]:
    baseline: HeapBaseline = request.app.state.heap_baseline
    api = await asyncio.to_thread(baseline.growth, top)
    return {"api": api, "engine": await _engine_command(context, "memory", {"top": top})}


@router.post("/profile")
async def profile(body: ProfileRequest, context: Context) -> dict[str, Any]:
    return await _engine_command(context, "profile", body.model_dump(), MAX_PROFILE_TIMEOUT)


@router.post("/faults")
async def faults(body: FaultsRequest, context: Context) -> dict[str, Any]:
    if not context.guard.config.enable_fault_injection:
        raise APIError(404, "fault injection is off (start with --enable-fault-injection)")
    result = await _engine_command(context, "faults", body.model_dump())
    context.guard.events.record(
        "action", "faults", f"faults armed: {result}", severity="warning", details=result
    )
    return result


@router.post("/remediate")
async def remediate(body: RemediateRequest, context: Context) -> dict[str, Any]:
    """Run one rung of the ladder now (an operator's lever; also how tests drive it)."""
    try:
        details = await context.guard.run_action(body.action, "requested")
    except Exception as e:
        raise APIError(503, f"{body.action} failed: {e}", code="remediation_failed") from e
    return {"action": body.action, "details": details}


async def _engine_command(
    context: Context, name: str, args: dict[str, Any], timeout: float = 60.0
) -> dict[str, Any]:
    try:
        return await context.engine.command(name, args, timeout)
    except EngineCommandError as e:
        raise APIError(503, f"the engine could not run {name}: {e}", code="engine_command") from e


def install_debug_routes(app: FastAPI) -> None:
    app.include_router(router)
