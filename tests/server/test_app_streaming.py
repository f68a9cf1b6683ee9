"""Streaming text with scripted tokens: a multi-byte character never splits across chunks, and
a stop string is never shown in part, even when it spans tokens."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from enduro.config import ServerConfig
from enduro.server.app import create_app
from enduro.server.engine_client import ModelInfo
from enduro.tokenizer import Tokenizer
from tests.server.fakes import ScriptedEngine

# Characters the tiny tokenizer never saw in training, so they are spelled in byte tokens.
TEXT = "Hello \u03a9mega \u4e2d\u6587 \U0001f680 caf\u00e9 world, this is the end."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Callable[[str], Path]) -> Tokenizer:
    return Tokenizer(tiny_model_dir("llama"))


def scripted_client(tokenizer: Tokenizer, text: str) -> tuple[TestClient, ScriptedEngine]:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    info = ModelInfo("/models/scripted", 1024, 512, (2,), None, 256, 4, "float32")
    engine = ScriptedEngine(info, token_ids)
    app = create_app(engine, tokenizer, info, ServerConfig())
    return TestClient(app), engine


def stream_texts(client: TestClient, **fields: object) -> list[str]:
    body = {"prompt": "x", "max_tokens": 200, "stream": True, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0]["text"] for e in events[:-1]]


def test_the_script_really_splits_characters_into_byte_tokens(tokenizer: Tokenizer) -> None:
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(TEXT, add_special_tokens=False)]
    assert any("\ufffd" in piece for piece in pieces)


def test_multi_byte_characters_never_split_across_chunks(tokenizer: Tokenizer) -> None:
    client, _ = scripted_client(tokenizer, TEXT)
    texts = stream_texts(client)
    assert "".join(texts) == TEXT
    assert not any("\ufffd" in text for text in texts)
    assert len(texts) > 10  # streamed token by token, not in one piece


def test_stop_string_spanning_tokens_is_never_shown_in_part(tokenizer: Tokenizer) -> None:
    client, engine = scripted_client(tokenizer, TEXT)
    texts = stream_texts(client, stop=["world, this"])
    assert "".join(texts) == TEXT[: TEXT.index("world, this")]
    assert not any("wor" in text for text in texts)
    assert len(engine.aborted) == 1  # the rest of the script was not generated


def test_chat_stream_of_the_same_script(tokenizer: Tokenizer) -> None:
    client, _ = scripted_client(tokenizer, TEXT)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2}
    response = client.post("/v1/chat/completions", json=body)
    events = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
    for index in (0, 1):
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"][0]["index"] == index]
        assert deltas[0]["role"] == "assistant"
        assert "".join(d.get("content", "") for d in deltas) == TEXT
