"""Engine states and failures: probes, draining, an engine dying mid-stream, a bug's 500."""

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.server.fakes import InProcessEngineClient, tiny_app, tiny_engine
from tests.server.test_app_errors import GOOD, assert_envelope

STREAM = {**GOOD, "max_tokens": 60, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    client = tiny_engine(tiny_model_dir("llama"))
    yield client
    client.close()


@pytest.fixture
def app(engine: InProcessEngineClient) -> Iterator[FastAPI]:
    app = tiny_app(engine)
    yield app
    admission = app.state.context.admission
    assert (admission.num_waiting, admission.num_waiting_tokens) == (0, 0)  # nothing leaked
    engine.is_ready = engine.is_healthy = True
    engine.die_after_outputs = None


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def test_probes_follow_the_engine(client: TestClient, engine: InProcessEngineClient) -> None:
    engine.num_restarts = 2
    assert client.get("/health").json() == {"status": "ok", "engine_restarts": 2}
    assert client.get("/ready").json() == {"status": "ok"}
    engine.is_healthy = False
    assert_envelope(client.get("/health"), 503)
    engine.is_ready = False
    assert_envelope(client.get("/ready"), 503)
    response = client.post("/v1/completions", json=GOOD)
    assert assert_envelope(response, 503)["code"] == "not_ready"
    assert response.headers["retry-after"] == "1"


def test_draining_refuses_new_generation_only(client: TestClient, app: FastAPI) -> None:
    app.state.draining = True
    assert_envelope(client.get("/ready"), 503)
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 200
    for path, body in (("/v1/completions", GOOD), ("/v1/chat/completions", {"messages": []})):
        response = client.post(path, json={**body, "messages": [{"role": "user", "content": "a"}]})
        assert assert_envelope(response, 503)["code"] == "draining"
        assert response.headers["retry-after"] == "1"
    app.state.draining = False
    assert client.post("/v1/completions", json=GOOD).status_code == 200


def test_engine_death_mid_stream_ends_with_an_error_frame(
    client: TestClient, engine: InProcessEngineClient
) -> None:
    engine.die_after_outputs = 5
    response = client.post("/v1/completions", json=STREAM)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
    assert all("choices" in json.loads(event) for event in events[:-2])
    assert client.post("/v1/completions", json=GOOD).status_code == 200


def test_engine_death_before_the_answer_is_a_503(
    client: TestClient, engine: InProcessEngineClient
) -> None:
    engine.die_after_outputs = 5
    response = client.post("/v1/completions", json={**STREAM, "stream": False})
    assert assert_envelope(response, 503)["code"] == "engine_unavailable"
    assert response.headers["retry-after"] == "1"


def test_a_bug_is_a_generic_500_with_the_traceback_in_the_log_only(
    client: TestClient,
    app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(text: str, add_special_tokens: bool = True) -> list[int]:
        raise RuntimeError("/srv/secret/path.py exploded")

    monkeypatch.setattr(app.state.context.tokenizer, "encode", broken)
    with caplog.at_level(logging.ERROR, logger="enduro.server"):
        response = client.post("/v1/completions", json=GOOD, headers={"x-request-id": "bug-1"})
    error = assert_envelope(response, 500)
    assert error == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "secret" not in response.text and response.headers["x-request-id"] == "bug-1"
    assert any(r.exc_info and "bug-1" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert client.post("/v1/completions", json=GOOD).status_code == 200


def test_stop_string_aborts_the_engine_request(
    client: TestClient, engine: InProcessEngineClient
) -> None:
    free = client.post("/v1/completions", json={**GOOD, "max_tokens": 12, "ignore_eos": True})
    text = free.json()["choices"][0]["text"]
    assert len(text) >= 6
    stop = text[4:6]
    cut = text[: text.index(stop)]
    num_aborted = len(engine.aborted)
    stopped = client.post(
        "/v1/completions", json={**GOOD, "max_tokens": 12, "ignore_eos": True, "stop": [stop]}
    )
    choice = stopped.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (cut, "stop")
    assert stopped.json()["usage"]["completion_tokens"] < 12
    # The engine request was stopped, not left running to max_tokens.
    assert len(engine.aborted) == num_aborted + 1
