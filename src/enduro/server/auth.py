"""API-key check on the normalised path, deny by default.

The path is normalised (percent-decoding repeated, `//` collapsed, `.` and `..` resolved) and
the request is routed on that same normalised path, so what is authorised is exactly what
runs: `//v1/models`, `/v1%2Fmodels` or `/x/../v1/models` cannot reach a route unchecked.
Only liveness/readiness probes and the version are open; everything else, the OpenAPI schema
and docs included, needs the key when one is configured.
"""

import hmac
import posixpath
import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from enduro.server.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/ready", "/version"})
MAX_DECODE_ROUNDS = 4
_SLASHES = re.compile(r"/+")


def normalise_path(path: str) -> str:
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = _SLASHES.sub("/", "/" + path.replace("\\", "/"))
    # normpath keeps a leading "//" (POSIX allows it); the slashes were collapsed first.
    return posixpath.normpath(path)


def bearer_key(scope: Scope) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            return key.strip() if scheme.lower() == b"bearer" else b""
    return b""


class AuthMiddleware:
    """Rewrites the path to its normal form; then, if an API key is set, answers 401 for any
    non-open path whose bearer key is missing or wrong."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = normalise_path(scope["path"])
        scope["path"] = path
        if self.api_key is not None and path not in OPEN_PATHS and not self._key_ok(scope):
            error = APIError(401, "missing or invalid API key (Authorization: Bearer KEY)")
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _key_ok(self, scope: Scope) -> bool:
        assert self.api_key is not None
        # compare_digest: the time taken does not reveal how much of the key matched.
        return hmac.compare_digest(bearer_key(scope), self.api_key)
