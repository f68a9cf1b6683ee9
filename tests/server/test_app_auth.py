"""API key: deny by default on the normalised path; only the probes and /version are open.

Requests go over a real socket with the path bytes exactly as written (http.client does not
normalise them), so uvicorn's own decoding is part of what is tested.
"""

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

KEY = "sk-test-key"
MODELS_PATHS = [
    "/v1/models",
    "//v1/models",
    "/v1%2Fmodels",
    "/v1%2fmodels",
    "/v1%252Fmodels",
    "/v1/./models",
    "/x/../v1/models",
    "/v1/models/",
    "/v1/models?x=1",
]
OTHER_PROTECTED = ["/V1/models", "/openapi.json", "/docs", "/HEALTH", "/nope", "/v1/models/.."]
OPEN = ["/health", "/ready", "/version", "//health", "/version/"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    client = tiny_engine(tiny_model_dir("llama"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def address(engine: InProcessEngineClient) -> Iterator[tuple[str, int]]:
    with serve(tiny_app(engine, api_key=KEY)) as url:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        yield parts.hostname, parts.port


def call(
    address: tuple[str, int], method: str, path: str, key: str | None, body: bytes | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_unauthorized(status: int, body: bytes) -> None:
    assert status == 401
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and KEY not in body.decode()


@pytest.mark.parametrize("path", MODELS_PATHS + OTHER_PROTECTED)
@pytest.mark.parametrize("key", [None, "", "wrong", KEY + "x", KEY[:-1]])
def test_wrong_or_missing_key_is_401_whatever_the_spelling(
    address: tuple[str, int], path: str, key: str | None
) -> None:
    assert_unauthorized(*call(address, "GET", path, key))


@pytest.mark.parametrize("path", MODELS_PATHS)
def test_right_key_reaches_the_normalised_route(address: tuple[str, int], path: str) -> None:
    status, body = call(address, "GET", path, KEY)
    assert status == 200
    assert json.loads(body)["data"][0]["id"] == "tiny"


def test_right_key_on_a_path_no_route_has_is_404(address: tuple[str, int]) -> None:
    assert call(address, "GET", "/V1/models", KEY)[0] == 404


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_version_are_open(address: tuple[str, int], path: str) -> None:
    assert call(address, "GET", path, None)[0] == 200


def test_generation_without_key_never_reaches_the_engine(
    address: tuple[str, int], engine: InProcessEngineClient
) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
    num_added = len(engine.added)
    for path in ("/v1/completions", "//v1/completions", "/v1%2Fcompletions"):
        assert_unauthorized(*call(address, "POST", path, None, body))
    assert len(engine.added) == num_added
    status, answer = call(address, "POST", "/v1/completions", KEY, body)
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2


def test_key_from_the_environment(
    engine: InProcessEngineClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENDURO_API_KEY", "from-env")
    with serve(tiny_app(engine)) as url:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        address = (parts.hostname, parts.port)
        assert call(address, "GET", "/v1/models", None)[0] == 401
        assert call(address, "GET", "/v1/models", "from-env")[0] == 200
