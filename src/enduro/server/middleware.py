"""Pure ASGI middleware that runs before any route: request ids, last-resort 500s, header and
body size caps.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass through
untouched and a body is counted as it arrives, before FastAPI parses it.
"""

import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
