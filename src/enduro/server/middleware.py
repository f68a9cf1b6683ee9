"""Pure ASGI middleware that runs before any route: telemetry, request ids, last-resort 500s,
header and body size caps.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass through
untouched and a body is counted as it arrives, before FastAPI parses it.
"""

import logging
import re
import time
import uuid
from collections.abc import Iterator

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enduro.observability.request_record import RECORD_KEY, RequestRecord
from enduro.observability.telemetry import Telemetry
from enduro.observability.tracing import TRACE_HEADERS
from enduro.server.auth import normalise_path
from enduro.server.errors import APIError, error_response, internal_error

logger = logging.getLogger("enduro.server")

REQUEST_ID_HEADER = b"x-request-id"
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and _SANE_REQUEST_ID.match(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def endpoint_of(scope: Scope) -> str:
    """The template of the route that served the request (whatever the method), or "other":
    the endpoint label stays within the app's routes."""
    route = scope.get("route")  # set by the router on the scope it was handed
    if route is None:  # answered before routing (401, 413, 431): match the path here
        route = _match_route(scope)
    return str(getattr(route, "path", None) or "other")


def _match_route(scope: Scope) -> BaseRoute | None:
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return None
    # Normalised here too: the header cap answers before AuthMiddleware rewrites the path.
    probe = {**scope, "path": normalise_path(scope["path"])}
    for route in _plain_routes(router.routes):
        match, _ = route.matches(probe)
        if match is not Match.NONE:
            return route
    return None


def _plain_routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """Routes and mounts, looking inside the routers FastAPI includes lazily (their prefix is
    not applied: this app includes routers without one)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _plain_routes(included.routes)
        else:
            yield route


def _trace_headers(scope: Scope) -> dict[str, str]:
    names = {name.encode(): name for name in TRACE_HEADERS}
    return {
        names[name]: value.decode("latin-1")
        for name, value in scope.get("headers", [])
        if name in names
    }


class TelemetryMiddleware:
    """Outermost: opens the request's record, watches its response go out, and hands the
    finished record to telemetry (span, log line, metrics) just before the last body message
    goes out (so a client that has its whole response finds it counted), or once the client
    has left or the request failed."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord("", scope.get("method", ""), trace_headers=_trace_headers(scope))
        scope.setdefault("state", {})[RECORD_KEY] = record
        finished = False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                record.request_id = request_id_of(scope)
                record.finish(endpoint_of(scope), time.monotonic())
                self.telemetry.observe(record)

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record.response_complete = True
                finish()
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception as exc:
            disconnected = isinstance(exc, ClientDisconnect | OSError)
            record.note_error("aborted" if disconnected else "internal")
            raise
        finally:
            finish()


class RequestIdMiddleware:
    """Outermost: gives every request an id, puts it on every response (errors included), and
    turns an unhandled exception into a generic 500 while the traceback goes to the log only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                message["headers"] = [*headers, (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            if started:
                raise  # the status line is out; only closing the connection is left
            await error_response(internal_error())(scope, receive, send_with_id)


class HeaderLimitMiddleware:
    """431 for too many or too large headers, before auth or routing looks at them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            size = sum(len(name) + len(value) for name, value in headers)
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                error = APIError(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_too_large(max_body_bytes: int) -> APIError:
    return APIError(413, f"request body exceeds {max_body_bytes} bytes")


class BodyLimitMiddleware:
    """413 when Content-Length says the body is too big, and again while reading when a body
    (chunked, or lying about its length) grows past the cap, before anything parses it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check_content_length(scope)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _check_content_length(self, scope: Scope) -> APIError | None:
        for name, value in scope.get("headers", []):
            if name != b"content-length":
                continue
            if not value.isdigit() or len(value) > 18:
                return APIError(400, "invalid Content-Length header")
            if int(value) > self.max_body_bytes:
                return body_too_large(self.max_body_bytes)
        return None

    def _counting(self, receive: Receive) -> Receive:
        num_bytes = 0

        async def counting_receive() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:
                    # Raised inside request.body(): FastAPI re-raises HTTPExceptions as they are.
                    raise body_too_large(self.max_body_bytes)
            return message

        return counting_receive
