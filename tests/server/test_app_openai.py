"""The official openai SDK (sync, async, streaming) against a real uvicorn on loopback."""

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from enduro import LLM, SamplingParams
from tests.server.fakes import InProcessEngineClient, serve, tiny_app, tiny_engine

KEY = "sk-test"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time"]
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, who are you?"},
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def base_url(model_dir: Path) -> Iterator[str]:
    engine: InProcessEngineClient = tiny_engine(model_dir)
    with serve(tiny_app(engine, api_key=KEY)) as url:
        yield f"{url}/v1"
    engine.close()


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def test_greedy_completion_equals_offline_generation(
    client: openai.OpenAI, model_dir: Path
) -> None:
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_blocks=256)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    offline = [output.outputs[0] for output in llm.generate(PROMPTS, params)]
    for prompt, expected in zip(PROMPTS, offline, strict=True):
        answer = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, extra_body=_ignore_eos()
        )
        assert answer.choices[0].text == expected.text
        assert answer.usage is not None
        assert answer.usage.completion_tokens == len(expected.token_ids) == 16
        assert answer.choices[0].finish_reason == "length"


def _ignore_eos() -> dict[str, Any]:
    return {"ignore_eos": True}


def test_chat_usage_is_exact(client: openai.OpenAI, base_url: str) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    prompt_ids = httpx.post(
        base_url.removesuffix("/v1") + "/tokenize",
        json={"messages": MESSAGES},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == prompt_ids["count"]
    assert answer.usage.completion_tokens == len(choice.logprobs.content)
    assert answer.usage.total_tokens == prompt_ids["count"] + len(choice.logprobs.content)


def test_streaming_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, temperature=0, extra_body=_ignore_eos()
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=_ignore_eos(),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_stream_with_stop_string(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, extra_body=_ignore_eos()
    )
    text = free.choices[0].text
    stop = text[6:9]
    options: dict[str, Any] = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 24}
    options.update(temperature=0, stop=[stop, "never-seen"], extra_body=_ignore_eos())
    stopped = client.completions.create(**options)
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **options))
    assert streamed == stopped.choices[0].text


def test_n_choices_with_a_seed_differ_and_reproduce(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        answer = client.completions.create(
            model="tiny", prompt=PROMPTS[2], max_tokens=12, n=3, temperature=1.0, seed=7
        )
        assert sorted(c.index for c in answer.choices) == [0, 1, 2]
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

    first = sample()
    assert len(set(first)) == 3
    assert sample() == first


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert answer.usage is not None and len(logprobs.tokens) == answer.usage.completion_tokens
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    # Greedy: each chosen token is the most likely one.
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()))
    assert logprobs.text_offset is not None
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_prompt_logprobs(client: openai.OpenAI) -> None:
    prompt = [1, 74, 75, 300, 12, 6]
    answer = client.completions.create(
        model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == len(prompt) + 1
    assert logprobs.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None


def test_async_client_concurrent_requests_match_sequential(
    client: openai.OpenAI, base_url: str
) -> None:
    sequential = [
        client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]

    async def concurrently() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
        async with async_client:
            answers = await asyncio.gather(
                *(
                    async_client.completions.create(
                        model="tiny", prompt=p, max_tokens=10, temperature=0
                    )
                    for p in PROMPTS
                )
            )
            stream = await async_client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=5, stream=True
            )
            assert [c async for c in stream]
        return [a.choices[0].text for a in answers]

    assert asyncio.run(concurrently()) == sequential


def test_sdk_errors(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    assert bad.value.body is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="x")
    wrong_key = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]
