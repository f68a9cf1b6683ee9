"""Logs: one line per finished request (JSON or text), prompts only when asked for, engine
events with their own fields."""

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from enduro.config import ServerConfig
from enduro.engine.loop import PREEMPTION_LOG_INTERVAL, EngineLoop
from enduro.observability.logging import (
    REQUEST_LOGGER,
    configure_logging,
    make_formatter,
)
from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[InProcessEngineClient]:
    engine = tiny_engine(tiny_model_dir("llama"))
    yield engine
    engine.close()


class Captured:
    """A logger's lines, formatted as a server would write them."""

    def __init__(self, logger: logging.Logger, log_format: str, role: str = "api") -> None:
        self.logger, self.buffer = logger, io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(make_formatter(log_format, role))

    def __enter__(self) -> "Captured":
        self.previous_level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous_level)

    @property
    def lines(self) -> list[str]:
        return self.buffer.getvalue().splitlines()

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


def request_log(log_format: str = "json") -> Captured:
    return Captured(logging.getLogger(REQUEST_LOGGER), log_format)


def test_one_json_line_per_finished_request(engine: InProcessEngineClient) -> None:
    with request_log() as log, serve(tiny_app(engine)) as url:
        body = {"prompt": "Hello world", "max_tokens": 4, **GREEDY}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 0})
        httpx.get(f"{url}/health")  # quiet: DEBUG, not written at INFO
    ok, rejected = log.objects
    assert {key: ok[key] for key in ok if key not in ("time", "pid")} == {
        "level": "INFO",
        "logger": "enduro.request",
        "message": f"POST /v1/completions 200 {ok['duration_seconds']:.3f} s",
        "role": "api",
        "event": "request",
        "request_id": answer.headers["x-request-id"],
        "trace_id": None,  # no traceparent, no tracing configured
        "span_id": None,
        "method": "POST",
        "endpoint": "/v1/completions",
        "status": 200,
        "error": None,
        "model": "tiny",
        "stream": False,
        "prompt_tokens": answer.json()["usage"]["prompt_tokens"],
        "generation_tokens": 4,
        "queue_seconds": ok["queue_seconds"],
        "ttft_seconds": ok["ttft_seconds"],
        "duration_seconds": ok["duration_seconds"],
        "finish_reasons": ["length"],
    }
    assert 0 <= ok["queue_seconds"] <= ok["ttft_seconds"] <= ok["duration_seconds"]
    assert "prompts" not in ok  # --log-prompts is off
    assert rejected["request_id"] == bad.headers["x-request-id"]
    assert (rejected["status"], rejected["error"]) == (400, "validation")
    assert rejected["ttft_seconds"] is None and rejected["generation_tokens"] == 0


def test_prompts_are_logged_only_with_log_prompts(engine: InProcessEngineClient) -> None:
    messages = [{"role": "user", "content": "my secret plan"}]
    for log_prompts in (False, True):
        with request_log() as log, serve(tiny_app(engine, log_prompts=log_prompts)) as url:
            for prompt in (["first prompt", "second prompt"], [5, 6, 7]):
                body = {"prompt": prompt, "max_tokens": 2, **GREEDY}
                assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
            chat = {"messages": messages, "max_tokens": 2, **GREEDY}
            httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        texts, ids, chat_line = log.objects
        if not log_prompts:
            assert "prompts" not in texts
            assert "first prompt" not in log.buffer.getvalue()
            assert "secret" not in log.buffer.getvalue()
            continue
        assert texts["prompts"] == ["first prompt", "second prompt"]
        assert ids["prompts"] == [None]  # sent as token ids: no text to log
        (rendered,) = chat_line["prompts"]
        assert "my secret plan" in rendered


def test_text_lines_carry_the_fields_as_key_value(engine: InProcessEngineClient) -> None:
    with request_log("text") as log, serve(tiny_app(engine)) as url:
        body = {"prompt": "Hello world", "max_tokens": 3, **GREEDY}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    (line,) = log.lines
    request_id = answer.headers["x-request-id"]
    assert " INFO api " in line and "enduro.request: POST /v1/completions 200 " in line
    assert f'request_id="{request_id}"' in line
    assert "generation_tokens=3 " in line and 'finish_reasons=["length"]' in line


def test_preemption_bursts_are_one_line_per_interval() -> None:
    loop = EngineLoop(None, None)  # type: ignore[arg-type]  # only its logging is used
    with Captured(logging.getLogger("enduro.engine"), "json", "engine") as log:
        loop._log_preemptions(3, now=100.0)
        loop._log_preemptions(5, now=101.0)  # within the interval: held back
        loop._log_preemptions(5, now=100.0 + PREEMPTION_LOG_INTERVAL)
        loop._log_preemptions(5, now=200.0)  # nothing new: no line
    first, second = log.objects
    assert (first["event"], first["num_preemptions"], first["role"]) == (
        "preemption_burst",
        3,
        "engine",
    )
    assert (second["event"], second["num_preemptions"]) == ("preemption_burst", 2)
    assert first["level"] == "WARNING"


def test_configure_logging_puts_one_handler_on_the_root() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("json", "api")
        configure_logging("json", "api")  # idempotent: still one
        (handler,) = root.handlers
        buffer = io.StringIO()
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        logging.getLogger("enduro.server").info(
            "engine process %d starting", 42, extra={"event": "engine_start", "engine_pid": 42}
        )
        line = json.loads(buffer.getvalue())
        assert (line["message"], line["event"], line["engine_pid"]) == (
            "engine process 42 starting",
            "engine_start",
            42,
        )
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_log_format_is_validated() -> None:
    assert ServerConfig(log_format="json").log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="yaml")
    with pytest.raises(ValueError, match="log format"):
        make_formatter("yaml", "api")
