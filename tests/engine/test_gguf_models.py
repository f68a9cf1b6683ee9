"""Architectures loaded from GGUF files written with the gguf package, against transformers."""

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from enduro import LLM, SamplingParams
from tests.conftest import build_tiny_hf_model, tiny_config
from tests.engine.reference import hf_greedy
from tests.engine.test_llm import PROMPTS
from tests.loading.gguf_writer import write_tiny_gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "glm4", "gemma3"])
def test_gguf_model_matches_transformers(arch: str, tmp_path: Path) -> None:
    reference = build_tiny_hf_model(arch)
    path = write_tiny_gguf(reference, tiny_config(arch), tmp_path / f"{arch}.gguf", arch)
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=64, cache_dir=str(tmp_path))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, logprobs = hf_greedy(reference, prompt, 20)
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        assert completion.logprobs is not None
        assert [lp.logprob for lp in completion.logprobs] == pytest.approx(logprobs, abs=1e-4)


def test_quantized_gguf_runs_close_to_its_source(tmp_path: Path) -> None:
    """Q8_0 weights: logprobs of the greedy path stay near the fp32 model's."""
    reference = build_tiny_hf_model("llama")
    path = write_tiny_gguf(
        reference,
        tiny_config("llama"),
        tmp_path / "q8.gguf",
        "llama",
        tensor_type=GGMLQuantizationType.Q8_0,
    )
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=64, cache_dir=str(tmp_path))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    (output,) = llm.generate([PROMPTS[2]], params)
    assert output.prompt_logprobs is not None
    ours = torch.tensor([lp.logprob for lp in output.prompt_logprobs[1:] if lp])
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPTS[2]])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(PROMPTS[2][1:])[:, None])
    assert torch.allclose(ours, expected.squeeze(1), atol=0.05)
