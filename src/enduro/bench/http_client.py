"""An async OpenAI-compatible client that sends one workload request and times it.

Streams are read as server-sent events (`data: {...}` lines ending with `data: [DONE]`). A token
chunk is a chunk with non-empty text; its arrival time is one entry of `token_times`. The first
one gives the time to first token; TPOT is (end-to-end latency - TTFT) / (output tokens - 1),
the mean time per output token after the first, as vLLM's serving benchmark computes it.
Non-streamed requests have no TTFT nor TPOT.
"""

import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from enduro.bench.workloads import WorkloadRequest

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_TEXT_CHARS = 500  # enough of an error body to tell what went wrong


@dataclass
class RequestResult:
    status: int | None
    """The HTTP status; None when no response came (connection error, timeout)."""
    error: str | None = None
    """Why the request failed: the error body, an error frame mid-stream, or the exception."""
    ttft: float | None = None
    """Seconds from sending to the first token chunk (streams only)."""
    token_times: list[float] = field(default_factory=list)
    """Seconds from sending to each token chunk (streams only)."""
    latency: float = 0.0
    """Seconds from sending to the end of the response (or to the client's abort)."""
    num_output_tokens: int = 0
    """From the response's `usage` when present, else the number of token chunks."""
    prompt_tokens: int | None = None
    text: str = ""
    aborted: bool = False
    """The client closed the stream after `abort_after_tokens` token chunks."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.num_output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.num_output_tokens - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.token_times)]


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text of a completions (`text`) or chat (`delta.content`) chunk or response."""
    parts = []
    for choice in chunk.get("choices") or []:
        message = choice.get("delta") or choice.get("message") or {}
        parts.append(choice.get("text") or message.get("content") or "")
    return "".join(parts)


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream: split at \r\n, \n or \r only, as the SSE spec says.

    Not httpx's `aiter_lines`, which splits like str.splitlines, also at U+0085, U+2028 and
    U+2029: JSON leaves those unescaped inside strings, so a generated token holding one cut
    its `data:` line in two and the client failed to parse a well-formed event.
    """
    pending = ""
    async for chunk in chunks:
        pending += chunk
        # A trailing \r may be the first half of \r\n: wait for the next chunk.
        cut = len(pending) - 1 if pending.endswith("\r") else len(pending)
        lines = re.split(r"\r\n|\r|\n", pending[:cut])
        pending = lines.pop() + pending[cut:]
        for line in lines:
            yield line
    if pending:
        yield pending.removesuffix("\r")


class _StreamReader:
    """Accumulates one SSE stream's chunks into a RequestResult."""

    def __init__(self, result: RequestResult, started: float, abort_after: int | None) -> None:
        self.result = result
        self.started = started
        self.abort_after = abort_after
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> bool:
        """Takes one line; False when the stream is over for the client."""
        if not line.startswith("data:"):
            return True
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return False
        chunk = json.loads(data)
        if "error" in chunk:
            self.result.error = json.dumps(chunk["error"])[:ERROR_TEXT_CHARS]
            return False
        self.usage = chunk.get("usage") or self.usage
        text = chunk_text(chunk)
        if text:
            self.result.token_times.append(time.perf_counter() - self.started)
            self.result.text += text
        if self.abort_after is not None and len(self.result.token_times) >= self.abort_after:
            self.result.aborted = True
            return False
        return True

    def finish(self) -> RequestResult:
        result = self.result
        result.latency = time.perf_counter() - self.started
        result.ttft = result.token_times[0] if result.token_times else None
        result.num_output_tokens = len(result.token_times)
        if self.usage is not None and not result.aborted:
            result.num_output_tokens = int(self.usage.get("completion_tokens", 0))
            result.prompt_tokens = self.usage.get("prompt_tokens")
        return result


class OpenAIClient:
    """One connection pool to a server; `send` never raises for HTTP or connection errors."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def __aenter__(self) -> "OpenAIClient":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.http.aclose()

    async def send(self, request: WorkloadRequest, model: str | None = None) -> RequestResult:
        body = {**request.body, "stream": request.stream}
        if model is not None:
            body.setdefault("model", model)
        if request.stream:
            body.setdefault("stream_options", {"include_usage": True})
        started = time.perf_counter()
        try:
            if request.stream:
                return await self._stream(PATHS[request.endpoint], body, request, started)
            return await self._whole(PATHS[request.endpoint], body, started)
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            message = f"{type(error).__name__}: {error}"[:ERROR_TEXT_CHARS]
            status = (
                error.response.status_code if isinstance(error, httpx.HTTPStatusError) else None
            )
            return RequestResult(status, message, latency=time.perf_counter() - started)

    async def _whole(self, path: str, body: dict[str, Any], started: float) -> RequestResult:
        response = await self.http.post(path, json=body)
        result = RequestResult(response.status_code, latency=time.perf_counter() - started)
        if response.status_code != 200:
            result.error = response.text[:ERROR_TEXT_CHARS]
            return result
        payload = response.json()
        result.text = chunk_text(payload)
        usage = payload.get("usage") or {}
        result.num_output_tokens = int(usage.get("completion_tokens", 0))
        result.prompt_tokens = usage.get("prompt_tokens")
        return result

    async def _stream(
        self, path: str, body: dict[str, Any], request: WorkloadRequest, started: float
    ) -> RequestResult:
        # Leaving the `async with` early closes the connection: the server sees the abort.
        async with self.http.stream("POST", path, json=body) as response:
            result = RequestResult(response.status_code)
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")
                result.error = result.error[:ERROR_TEXT_CHARS]
                result.latency = time.perf_counter() - started
                return result
            reader = _StreamReader(result, started, request.abort_after_tokens)
            async for line in sse_lines(response.aiter_text()):
                if not reader.feed(line):
                    break
            return reader.finish()
