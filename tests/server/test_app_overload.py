"""Overload and disconnects: a full queue answers 503 + Retry-After at once while admitted
requests complete correctly; a client that goes away aborts its engine requests."""

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

LONG = {"prompt": "Hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    # One request runs at a time and each step takes a while, so requests really queue.
    client = tiny_engine(tiny_model_dir("llama"), step_delay=0.005, max_num_seqs=1)
    yield client
    client.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.asyncio
async def test_queue_full_gets_503_and_admitted_requests_complete(
    engine: InProcessEngineClient,
) -> None:
    app = tiny_app(engine, max_queue=2)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://enduro") as client:
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=LONG) for _ in range(10))
        )
        expected = (await client.post("/v1/completions", json=LONG)).json()["choices"][0]["text"]
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(rejected) == 10
    assert len(ok) >= 2 and len(rejected) >= 5
    for response in rejected:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
    for response in ok:
        assert response.json()["choices"][0]["text"] == expected
        assert response.json()["usage"]["completion_tokens"] == 16
    context = app.state.context
    assert (context.admission.num_waiting, context.admission.num_waiting_tokens) == (0, 0)


@pytest.fixture(scope="module")
def base_url(engine: InProcessEngineClient) -> Iterator[str]:
    with serve(tiny_app(engine)) as url:
        yield url


def aborted_with_prefix(engine: InProcessEngineClient, prefix: str) -> list[str]:
    return [rid for rid in list(engine.aborted) if rid.startswith(prefix)]


def assert_engine_idle(engine: InProcessEngineClient) -> None:
    wait_until(lambda: engine.num_unfinished == 0)
    assert engine.num_used_blocks == 0


def test_stream_disconnect_aborts_the_engine_request(
    engine: InProcessEngineClient, base_url: str
) -> None:
    body = {**LONG, "max_tokens": 800, "stream": True}
    headers = {"x-request-id": "gone-stream"}
    with (
        httpx.Client(base_url=base_url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())  # generation is under way
    wait_until(lambda: bool(aborted_with_prefix(engine, "gone-stream.")))
    assert_engine_idle(engine)


def test_non_streaming_disconnect_aborts_the_engine_request(
    engine: InProcessEngineClient, base_url: str
) -> None:
    body = {**LONG, "max_tokens": 800}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(base_url=base_url, timeout=0.5) as client,
    ):
        client.post("/v1/completions", json=body, headers={"x-request-id": "gone-plain"})
    wait_until(lambda: bool(aborted_with_prefix(engine, "gone-plain.")))
    assert_engine_idle(engine)


def test_chunked_body_over_the_cap_is_413(
    engine: InProcessEngineClient,
) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(64):  # 4 MB, no Content-Length: only counting can catch it
            yield b" " * 65536

    with serve(tiny_app(engine, max_body_bytes=256 * 1024)) as url:
        try:
            response = httpx.post(f"{url}/v1/completions", content=body(), timeout=30)
        except httpx.HTTPError:
            pytest.skip("the server closed the connection before the client read the 413")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
