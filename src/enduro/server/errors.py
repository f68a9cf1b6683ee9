"""The OpenAI error envelope, `{"error": {"message", "type", "param", "code"}}`, on every error.

Messages are ours and short: they name the parameter and the limit, never echo the client's
input (which could be megabytes, or a secret pasted into a prompt), and never carry a
traceback or a path.
"""

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from enduro.observability.request_record import record_of

logger = logging.getLogger("enduro.server")

MAX_MESSAGE_CHARS = 300
MAX_PARAM_CHARS = 80
RETRY_AFTER_SECONDS = 1

# Why a field-name part of a validation location is safe to show: it is one of our identifiers.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")

_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    431: ("invalid_request_error", "headers_too_large"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "unavailable"),
}


class APIError(HTTPException):
    """An error answered with the envelope. A starlette HTTPException, so FastAPI lets it
    through unchanged when it is raised while the body is being read (see limits)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message[:MAX_MESSAGE_CHARS], headers)
        self.message = message[:MAX_MESSAGE_CHARS]
        self.param = param[:MAX_PARAM_CHARS] if param else None
        self.type, default_code = _TYPES.get(status_code, ("invalid_request_error", None))
        self.code = code or default_code


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def unavailable(message: str, code: str) -> APIError:
    """503: a condition that passes (queue full, draining, engine restarting)."""
    return APIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def envelope(error: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# The `reason` of enduro_request_errors_total (observability/request_record.py) for an error:
# by its code where the status alone is ambiguous (503s), else by its status.
_REASON_BY_CODE = {
    "overloaded": "overloaded",
    "draining": "draining",
    "not_ready": "engine",
    "engine_unavailable": "engine",
    "aborted": "aborted",
}
_REASON_BY_STATUS = {
    400: "validation",
    401: "unauthorized",
    404: "not_found",
    405: "not_found",
    413: "too_large",
    431: "too_large",
    499: "aborted",
}


def error_reason(error: APIError) -> str:
    if error.code in _REASON_BY_CODE:
        return _REASON_BY_CODE[error.code]
    default = "internal" if error.status_code >= 500 else "validation"
    return _REASON_BY_STATUS.get(error.status_code, default)


class EnvelopeResponse(JSONResponse):
    """An error in the envelope; sending it notes the error's reason in the request record."""

    def __init__(self, error: APIError) -> None:
        super().__init__(envelope(error), status_code=error.status_code, headers=error.headers)
        self.reason = error_reason(error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record_of(scope).note_error(self.reason)
        await super().__call__(scope, receive, send)


def error_response(error: APIError) -> JSONResponse:
    return EnvelopeResponse(error)


def internal_error() -> APIError:
    return APIError(500, "internal server error")


def from_validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as a 400 naming the first bad parameter; pydantic's `input` is dropped."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid("the body is not valid JSON")
    param = _param_from_loc(first.get("loc", ()))
    if param is None:
        return invalid("the body must be a JSON object (Content-Type: application/json)")
    return invalid(f"{param}: {first.get('msg', 'invalid value')}", param)


def _param_from_loc(loc: Any) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Union members appear in the location under internal names ("list[int]"); stop there.
    safe: list[str] = []
    for part in parts[:4]:
        if not (part.isdigit() or _IDENTIFIER.match(part)):
            break
        safe.append(part)
    return ".".join(safe) or None


def _from_http_exception(exc: HTTPException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if exc.status_code == 400:
        # FastAPI's "error parsing the body": e.g. bytes that are not UTF-8.
        return invalid("the body is not valid UTF-8 JSON")
    if exc.status_code == 404:
        return APIError(404, "no such route")
    if exc.status_code == 405:
        return APIError(405, "method not allowed for this route", headers=dict(exc.headers or {}))
    if exc.status_code >= 500:
        return internal_error()
    return APIError(exc.status_code, "request rejected")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(_from_http_exception(exc))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_error(exc))

    app.add_exception_handler(HTTPException, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
