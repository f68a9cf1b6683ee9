"""Bad input, table-driven: each case gets its status and OpenAI's error envelope (small, never
echoing the input), nothing reaches the engine, and the server keeps serving."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.fakes import InProcessEngineClient, tiny_app, tiny_engine

MAX_ERROR_BYTES = 4096
SECRET = "s3cr3t-input"  # put into bad fields: an error body must never contain it
JSON = {"content-type": "application/json"}
GOOD = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def completion(**fields: Any) -> dict[str, Any]:
    return {"json": {**GOOD, **fields}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"json": {**CHAT, **fields}}


def raw(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": JSON}


def chunked(num_bytes: int) -> Iterator[bytes]:
    chunk = b" " * 65536
    for _ in range(num_bytes // len(chunk)):
        yield chunk


COMPLETIONS, CHATS = "/v1/completions", "/v1/chat/completions"
# (case, method, path, request, status, param)
CASES: list[tuple[str, str, str, dict[str, Any], int, str | None]] = [
    ("malformed JSON", "POST", COMPLETIONS, raw(b'{"prompt": "s3cr3t-input'), 400, None),
    ("JSON array", "POST", COMPLETIONS, raw(b'["s3cr3t-input"]'), 400, None),
    ("invalid UTF-8", "POST", COMPLETIONS, raw(b'{"prompt": "s3cr3t-input\xff\xfe"}'), 400, None),
    ("no prompt", "POST", COMPLETIONS, {"json": {"max_tokens": 2}}, 400, "prompt"),
    ("unknown model", "POST", COMPLETIONS, completion(model=SECRET), 404, "model"),
    ("unknown model, chat", "POST", CHATS, chat(model=SECRET), 404, "model"),
    ("max_tokens 0", "POST", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens -1", "POST", COMPLETIONS, completion(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens 10^9", "POST", COMPLETIONS, completion(max_tokens=10**9), 400, "max_tokens"),
    ("chat max_tokens 0", "POST", CHATS, chat(max_tokens=0), 400, "max_tokens"),
    (
        "ids over context",
        "POST",
        COMPLETIONS,
        completion(prompt=[5] * 1020, max_tokens=16),
        400,
        "max_tokens",
    ),
    ("text over context", "POST", COMPLETIONS, completion(prompt="fox " * 1100), 400, "max_tokens"),
    (
        "chat over context",
        "POST",
        CHATS,
        chat(messages=[{"role": "user", "content": "fox " * 1100}]),
        400,
        None,
    ),
    ("temperature -1", "POST", COMPLETIONS, completion(temperature=-1), 400, "temperature"),
    (
        "temperature NaN",
        "POST",
        COMPLETIONS,
        raw(b'{"prompt": "x", "temperature": NaN, "user": "s3cr3t-input"}'),
        400,
        "temperature",
    ),
    ("temperature 'NaN'", "POST", COMPLETIONS, completion(temperature="NaN"), 400, "temperature"),
    ("temperature 'hot'", "POST", COMPLETIONS, completion(temperature=SECRET), 400, "temperature"),
    ("stop ['']", "POST", COMPLETIONS, completion(stop=[""]), 400, "stop"),
    ("100 stop strings", "POST", COMPLETIONS, completion(stop=[SECRET] * 100), 400, "stop"),
    ("stop string too long", "POST", CHATS, chat(stop=SECRET * 100), 400, "stop"),
    ("n 10^6", "POST", COMPLETIONS, completion(n=10**6), 400, "n"),
    ("n above max_n", "POST", CHATS, chat(n=9), 400, "n"),
    ("logprobs 10^6", "POST", COMPLETIONS, completion(logprobs=10**6), 400, "logprobs"),
    (
        "top_logprobs 10^6",
        "POST",
        CHATS,
        chat(logprobs=True, top_logprobs=10**6),
        400,
        "top_logprobs",
    ),
    ("top_logprobs alone", "POST", CHATS, chat(top_logprobs=2), 400, "top_logprobs"),
    ("token id beyond vocab", "POST", COMPLETIONS, completion(prompt=[5, 10**6]), 400, "prompt"),
    ("negative token id", "POST", COMPLETIONS, completion(prompt=[-1]), 400, "prompt"),
    ("empty prompt list", "POST", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("200 prompts", "POST", COMPLETIONS, completion(prompt=["a"] * 200), 400, "prompt"),
    (
        "prompts x n over the queue",
        "POST",
        COMPLETIONS,
        completion(prompt=["a"] * 5, n=2),
        400,
        None,
    ),
    (
        "2000 messages",
        "POST",
        CHATS,
        chat(messages=[{"role": "user", "content": "a"}] * 2000),
        400,
        "messages",
    ),
    (
        "image part",
        "POST",
        CHATS,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": SECRET}]}]),
        400,
        "messages.0.content",
    ),
    (
        "unknown role",
        "POST",
        CHATS,
        chat(messages=[{"role": SECRET, "content": "a"}]),
        400,
        "messages.0.role",
    ),
    ("10 MB body", "POST", COMPLETIONS, raw(b" " * (10 << 20)), 413, None),
    ("10 MB chunked body", "POST", COMPLETIONS, {"content": chunked(10 << 20)}, 413, None),
    (
        "huge header",
        "POST",
        COMPLETIONS,
        {**completion(), "headers": {"x-big": "a" * 20000}},
        431,
        None,
    ),
    (
        "bad Content-Length",
        "POST",
        COMPLETIONS,
        {**raw(b"{}"), "headers": {"content-length": "x"}},
        400,
        None,
    ),
    (
        "tokenize both",
        "POST",
        "/tokenize",
        {"json": {"prompt": "a", "messages": CHAT["messages"]}},
        400,
        None,
    ),
    (
        "detokenize beyond vocab",
        "POST",
        "/detokenize",
        {"json": {"tokens": [1, 10**6]}},
        400,
        "tokens",
    ),
    (
        "detokenize 200k ids",
        "POST",
        "/detokenize",
        {"json": {"tokens": [1] * 200_000}},
        400,
        "tokens",
    ),
    ("unknown route", "GET", "/v1/engines", {}, 404, None),
    ("wrong method", "DELETE", "/v1/models", {}, 405, None),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    client = tiny_engine(tiny_model_dir("llama"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(engine: InProcessEngineClient) -> Iterator[TestClient]:
    # max_queue 8: a batch of prompts x n above it can never be admitted (400, not 503).
    app = tiny_app(engine, max_queue=8, max_n=8, max_body_bytes=1 << 20)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_envelope(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert len(response.content) < MAX_ERROR_BYTES
    assert SECRET not in response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_gets_its_status_and_the_envelope(
    client: TestClient,
    engine: InProcessEngineClient,
    method: str,
    path: str,
    request_args: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    num_added = len(engine.added)
    response = client.request(method, path, **request_args)
    assert_envelope(response, status, param)
    assert len(engine.added) == num_added  # rejected before anything reached the engine
    good = client.post(COMPLETIONS, json=GOOD)
    assert good.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 2


def test_context_limit_message_names_the_numbers(client: TestClient) -> None:
    response = client.post(COMPLETIONS, json={**GOOD, "prompt": [5] * 1020, "max_tokens": 16})
    message = assert_envelope(response, 400, "max_tokens")["message"]
    assert message == "prompt (1020 tokens) + max_tokens (16) exceeds the context length (1024)"


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(client: TestClient) -> None:
    sane = client.post(COMPLETIONS, json=GOOD, headers={"x-request-id": "trace-42"})
    assert sane.headers["x-request-id"] == "trace-42"
    assert sane.json()["id"] == "cmpl-trace-42"
    for bad in ("x" * 200, "a b", "../../etc"):
        response = client.post(COMPLETIONS, json=GOOD, headers={"x-request-id": bad})
        assert response.headers["x-request-id"] != bad
        assert response.json()["id"] == f"cmpl-{response.headers['x-request-id']}"
    error = client.post(COMPLETIONS, json={**GOOD, "n": 10**6}, headers={"x-request-id": "e-1"})
    assert error.headers["x-request-id"] == "e-1"


def test_reused_request_ids_do_not_collide_in_the_engine(client: TestClient) -> None:
    headers = {"x-request-id": "same"}
    first = client.post(COMPLETIONS, json=GOOD, headers=headers)
    second = client.post(COMPLETIONS, json={**GOOD, "n": 2}, headers=headers)
    assert first.status_code == second.status_code == 200


def test_model_may_be_the_served_name_the_path_stem_or_omitted(
    client: TestClient, engine: InProcessEngineClient
) -> None:
    stem = Path(engine.model_info.source).stem
    for name in ("tiny", stem, None):
        body = {**GOOD, "model": name} if name else {k: v for k, v in GOOD.items() if k != "model"}
        response = client.post(COMPLETIONS, json=body)
        assert response.status_code == 200
        assert response.json()["model"] == "tiny"
