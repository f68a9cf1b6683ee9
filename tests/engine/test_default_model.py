"""The default model (Gemma 3 270M, GGUF Q4_K_M) end to end, against transformers.

transformers reads the same GGUF file with its own reader and dequantizer, so this also
checks enduro's GGUF loading. Slow: the reference takes about a minute to load.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from enduro import LLM, SamplingParams
from enduro.loading.loader import resolve_model_path
from enduro.request import FinishReason

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    yield LLM(None, dtype="float32")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def test_greedy_batch_equals_transformers(llm: LLM, reference: torch.nn.Module) -> None:
    assert llm.tokenizer is not None
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            expected = reference.generate(  # type: ignore[operator]
                ids, max_new_tokens=32, min_new_tokens=32, do_sample=False
            )[0, ids.shape[1] :].tolist()
        assert output.outputs[0].token_ids == expected, prompt
        assert output.outputs[0].text == llm.tokenizer.decode(expected)


def test_batch_invariance(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    others = [
        "Hi",
        "The history of mathematics is long and full of surprises, from counting",
        "1, 2, 3,",
        "A recipe:",
        "In 1969 the first humans landed on the Moon, and the world watched as",
        "Question: what is the largest planet? Answer:",
        "import numpy as np\n",
        "Dear Sir or Madam,",
    ]
    batch = llm.generate([*others[:3], PROMPTS[1], *others[3:]], params)
    assert batch[3].outputs[0].token_ids == alone


def test_stop_string_cuts_text(llm: LLM) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    full = llm.generate([PROMPTS[1]], params)[0].outputs[0]
    words = full.text.split()
    stop = words[3]
    cut = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=32, temperature=0.0, stop=(stop,)))
    completion = cut[0].outputs[0]
    assert completion.finish_reason is FinishReason.STOP
    assert completion.text == full.text[: full.text.index(stop)]
    assert len(completion.token_ids) < len(full.token_ids)


def test_streaming_equals_batch_text(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    whole = llm.generate([PROMPTS[2]], params)[0].outputs[0].text
    assert "".join(llm.stream(PROMPTS[2], params)) == whole


def test_default_model_resolves_offline() -> None:
    path = resolve_model_path(None)
    assert isinstance(path, Path)
    assert path.suffix == ".gguf"
