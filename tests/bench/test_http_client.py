import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from enduro.bench.http_client import OpenAIClient, sse_lines
from enduro.bench.workloads import WorkloadRequest
from tests.server.fakes import free_port, serve

Seen = list[dict[str, Any]]  # each request's body and Authorization header
Server = tuple[str, Seen]
TOKENS = ["Hello", " there", ",", " friend", "!"]
DELAY = 0.05  # seconds before each token chunk


def sse(chunk: object) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def fake_app(seen: Seen) -> FastAPI:
    """Streams TOKENS one chunk per DELAY; a prompt "fail" gets an error frame after one token;
    max_tokens < 0 gets a 400. Records each request's body and Authorization header."""
    app = FastAPI()

    async def events(body: dict[str, object], chat: bool) -> AsyncIterator[str]:
        if chat:  # as the real server: the role travels with the first token
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, token in enumerate(TOKENS):
            await asyncio.sleep(DELAY)
            choice = (
                {"index": 0, "delta": {"content": token}} if chat else {"index": 0, "text": token}
            )
            yield sse({"choices": [choice]})
            if body.get("prompt") == "fail" and i == 0:
                yield sse({"error": {"message": "the engine died", "code": 500}})
                return
        yield sse({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
        if body.get("stream_options"):
            yield sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}})
        yield "data: [DONE]\n\n"

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        if body.get("max_tokens", 0) < 0:
            return JSONResponse({"error": {"message": "max_tokens must be >= 0"}}, 400)
        if body.get("stream"):
            return StreamingResponse(events(body, chat), media_type="text/event-stream")
        usage = {"prompt_tokens": 3, "completion_tokens": 5}
        choice = {"message": {"content": "".join(TOKENS)}} if chat else {"text": "".join(TOKENS)}
        return JSONResponse({"choices": [choice], "usage": usage})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    seen: Seen = []
    with serve(fake_app(seen)) as url:
        yield url, seen


def completion(
    stream: bool = True, prompt: str = "hi", abort_after_tokens: int | None = None
) -> WorkloadRequest:
    body = {"prompt": prompt, "max_tokens": 8}
    return WorkloadRequest("completions", body, stream, abort_after_tokens)


@pytest.mark.asyncio
async def test_stream_times_every_token_and_counts_from_usage(server: Server) -> None:
    url, seen = server
    async with OpenAIClient(url, api_key="secret") as client:
        result = await client.send(completion(), model="tiny")
    assert result.ok and result.status == 200 and result.error is None
    assert result.text == "".join(TOKENS)
    assert result.num_output_tokens == 7 and result.prompt_tokens == 3  # usage wins over chunks
    assert len(result.token_times) == len(TOKENS)
    assert result.ttft == result.token_times[0] >= DELAY
    assert all(gap >= DELAY * 0.8 for gap in result.inter_token_latencies)
    assert result.latency >= result.token_times[-1]
    assert result.tpot == (result.latency - result.ttft) / 6
    body = seen[-1]["body"]
    assert body == {
        "prompt": "hi",
        "max_tokens": 8,
        "stream": True,
        "model": "tiny",
        "stream_options": {"include_usage": True},
    }
    assert seen[-1]["authorization"] == "Bearer secret"


@pytest.mark.asyncio
async def test_chat_stream_skips_the_empty_role_chunk(server: Server) -> None:
    request = WorkloadRequest("chat", {"messages": [{"role": "user", "content": "hi"}]}, True)
    async with OpenAIClient(server[0]) as client:
        result = await client.send(request)
    assert result.ok and result.text == "".join(TOKENS)
    assert len(result.token_times) == len(TOKENS) and result.ttft is not None
    assert result.ttft >= DELAY
    assert server[1][-1]["authorization"] is None


@pytest.mark.asyncio
async def test_non_streamed_reply_has_no_token_times(server: Server) -> None:
    async with OpenAIClient(server[0]) as client:
        result = await client.send(completion(stream=False))
    assert result.ok and result.text == "".join(TOKENS)
    assert (result.num_output_tokens, result.prompt_tokens) == (5, 3)
    assert result.ttft is None and result.tpot is None and result.token_times == []
    assert server[1][-1]["body"]["stream"] is False


@pytest.mark.asyncio
async def test_abort_closes_the_stream_after_n_tokens(server: Server) -> None:
    async with OpenAIClient(server[0]) as client:
        result = await client.send(completion(abort_after_tokens=2))
    assert result.ok and result.aborted
    assert result.text == "Hello there" and len(result.token_times) == 2
    assert result.num_output_tokens == 2  # counted chunks: no usage comes after an abort
    assert result.latency < DELAY * len(TOKENS)


@pytest.mark.asyncio
async def test_errors_are_results_not_exceptions(server: Server) -> None:
    async with OpenAIClient(server[0]) as client:
        midway = await client.send(completion(prompt="fail"))
    assert midway.status == 200 and not midway.ok
    assert "the engine died" in (midway.error or "") and midway.text == "Hello"
    async with OpenAIClient(f"http://127.0.0.1:{free_port()}") as client:
        refused = await client.send(completion())
    assert refused.status is None and not refused.ok and "ConnectError" in (refused.error or "")


@pytest.mark.asyncio
async def test_a_400_keeps_the_error_body(server: Server) -> None:
    request = WorkloadRequest("completions", {"prompt": "hi", "max_tokens": -1}, True)
    async with OpenAIClient(server[0]) as client:
        streamed = await client.send(request)
        request.stream = False
        whole = await client.send(request)
    for result in (streamed, whole):
        assert result.status == 400 and not result.ok
        assert "max_tokens must be >= 0" in (result.error or "")


async def _chunks(*parts: str) -> AsyncIterator[str]:
    for part in parts:
        yield part


@pytest.mark.asyncio
async def test_sse_lines_split_at_sse_line_ends_only() -> None:
    # A token holding U+2028 or U+0085 stays inside its JSON string (str.splitlines, and so
    # httpx's aiter_lines, would cut the line there); \r\n split across two chunks is one end.
    event = 'data: {"text": "a\u2028b\x85c"}'
    parts = (event[:10], event[10:] + "\r", "\n\ndata: [DO", "NE]\r", "data: x\n")
    lines = [line async for line in sse_lines(_chunks(*parts))]
    assert lines == [event, "", "data: [DONE]", "data: x"]
    assert [line async for line in sse_lines(_chunks("data: end\r"))] == ["data: end"]
