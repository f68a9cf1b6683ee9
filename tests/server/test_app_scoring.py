"""lm-eval-style loglikelihood: token-id prompts, echo, logprobs=1, max_tokens 1 or 0. The
prompt's token_logprobs must be the offline engine's prompt logprobs, the first one null."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from enduro import LLM, SamplingParams
from tests.server.fakes import tiny_app, tiny_engine

PROMPTS = [[1, 74, 75, 300, 12], [1, 5, 17, 42, 8, 99, 3, 250, 11, 7], list(range(40, 70))]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> list[list[float | None]]:
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_blocks=256)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    expected = []
    for prompt in PROMPTS:  # one at a time, as the API test sends them: same shapes, same sums
        (output,) = llm.generate([prompt], params)
        assert output.prompt_logprobs is not None
        expected.append([lp.logprob if lp is not None else None for lp in output.prompt_logprobs])
    return expected


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    engine = tiny_engine(model_dir)
    with TestClient(tiny_app(engine)) as test_client:
        yield test_client
    engine.close()


def score(client: TestClient, prompt: Any, max_tokens: int) -> list[dict[str, Any]]:
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": max_tokens}
    response = client.post("/v1/completions", json={**body, "temperature": 0})
    assert response.status_code == 200, response.text
    choices: list[dict[str, Any]] = response.json()["choices"]
    return choices


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_max_tokens_1_scores_the_prompt_like_the_offline_engine(
    client: TestClient, offline: list[list[float | None]], index: int
) -> None:
    prompt = PROMPTS[index]
    (choice,) = score(client, prompt, 1)
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][: len(prompt)] == offline[index]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then the generated token
    for position in range(1, len(prompt)):
        top = logprobs["top_logprobs"][position]
        token = logprobs["tokens"][position]
        assert top[token] == logprobs["token_logprobs"][position]
        assert max(top.values()) >= top[token]  # lm-eval's is_greedy compares these


def test_max_tokens_0_scores_the_prompt_only(
    client: TestClient, offline: list[list[float | None]]
) -> None:
    (choice,) = score(client, PROMPTS[1], 0)
    assert choice["logprobs"]["token_logprobs"] == offline[1]
    assert choice["finish_reason"] == "length"
    detokenized = client.post("/detokenize", json={"tokens": PROMPTS[1]}).json()["prompt"]
    assert choice["text"] == detokenized
    usage = client.post(
        "/v1/completions", json={"prompt": PROMPTS[1], "echo": True, "max_tokens": 0}
    ).json()["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}


def test_a_batch_of_prompts_scores_each(
    client: TestClient, offline: list[list[float | None]]
) -> None:
    choices = score(client, PROMPTS, 0)
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice, expected in zip(choices, offline, strict=True):
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-5)


def test_text_offsets_point_into_the_echoed_text(client: TestClient) -> None:
    (choice,) = score(client, "Hello world, this is", 3)
    logprobs = choice["logprobs"]
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    for offset, token in zip(offsets[1:], tokens[1:], strict=True):
        if token and "\ufffd" not in token:
            assert choice["text"][offset : offset + len(token)] == token
