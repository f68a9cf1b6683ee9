"""Choice deltas → one JSON response or an SSE stream, with the client's disconnect cancelling
generation either way.

A stream is primed (its first delta awaited) before the 200 goes out, so errors that show up
at once (engine down, request rejected by the engine) still get a proper status. After that,
an error becomes a `data: {"error": ...}` frame, and every stream ends with `data: [DONE]`.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from enduro.observability.request_record import RequestRecord, record_of
from enduro.server.errors import APIError, envelope, error_reason, internal_error
from enduro.server.generation import ChoiceDelta, ChoiceStreams
from enduro.server.protocol import Usage

logger = logging.getLogger("enduro.server")

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it; no client is left to read it


class Formatter(Protocol):
    """Turns deltas into the route's response shapes."""

    def chunk(self, delta: ChoiceDelta) -> BaseModel | None:
        """The chunk to stream for this delta (None: nothing visible), merged into the
        response when not streaming."""

    def usage(self) -> Usage: ...

    def usage_chunk(self) -> BaseModel: ...

    def response(self) -> BaseModel: ...


async def respond(
    request: Request, streams: ChoiceStreams, formatter: Formatter, stream: bool, usage: bool
) -> Response | BaseModel:
    """Collect the deltas into a response, or stream them as SSE chunks. Either way, once the
    streams are closed the request's record gets the usage the client was told (or would
    have been, had it stayed)."""
    record = record_of(request.scope)

    def note_usage() -> None:
        counts = formatter.usage()
        record.note_usage(counts.prompt_tokens, counts.completion_tokens)

    async def close() -> None:
        await streams.aclose()
        note_usage()

    if not stream:
        try:
            return await until_disconnected(request, _collect(streams, formatter))
        finally:
            await close()
    deltas = aiter(streams)
    try:
        first = await until_disconnected(request, anext(deltas))
    except BaseException:
        await close()
        raise
    # The usage is noted when the events end, before the response's last message (which is
    # when telemetry reads the record), and again on close for a stream that never started.
    events = _sse(first, deltas, formatter, usage, record, note_usage)
    return ClosingStreamingResponse(events, close, media_type="text/event-stream")


async def _collect(streams: ChoiceStreams, formatter: Formatter) -> BaseModel:
    async for delta in streams:
        formatter.chunk(delta)
    return formatter.response()


def _data(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else _json(payload)
    return f"data: {body}\n\n"


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


async def _sse(
    first: ChoiceDelta,
    rest: AsyncIterator[ChoiceDelta],
    formatter: Formatter,
    usage: bool,
    record: RequestRecord,
    note_usage: Callable[[], None],
) -> AsyncIterator[str]:
    try:
        async for delta in _chain(first, rest):
            chunk = formatter.chunk(delta)
            if chunk is not None:
                yield _data(chunk)
        if usage:
            yield _data(formatter.usage_chunk())
    except APIError as exc:
        record.note_error(error_reason(exc))
        yield _data(envelope(exc))
    except Exception:
        logger.exception("stream failed after it started")
        record.note_error("internal")
        yield _data(envelope(internal_error()))
    finally:
        note_usage()
    yield "data: [DONE]\n\n"


async def _chain(
    first: ChoiceDelta, rest: AsyncIterator[ChoiceDelta]
) -> AsyncIterator[ChoiceDelta]:
    yield first
    async for delta in rest:
        yield delta


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even when the client disconnects
    before the body iterator was started (whose own `finally` would then never run)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        media_type: str,
    ) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Await `work`, cancelling it (499) if the client disconnects first; cancelling it is what
    aborts the engine requests behind it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in (task, watcher):
            future.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise APIError(CLIENT_CLOSED_REQUEST, "the client closed the request")
    return task.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body has been read by now, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
