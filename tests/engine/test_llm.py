"""The whole engine (scheduler, paged KV cache, runner, sampler) against transformers."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from enduro import LLM, SamplingParams
from enduro.request import FinishReason
from tests.conftest import ARCHITECTURES
from tests.engine.reference import hf_greedy, hf_prompt_logprobs

PROMPTS = [
    [5, 17, 42, 8, 99, 3, 250, 11, 7],
    [300, 12, 6],
    [*range(40, 70)],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)


def tiny_llm(path: Path, **kwargs: Any) -> LLM:
    options: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_blocks": 128}
    options.update(kwargs)
    return LLM(str(path), **options)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_and_logprobs_match_transformers(
    arch: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    path = tiny_model_dir(arch)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = tiny_llm(path, max_num_batched_tokens=32).generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, logprobs = hf_greedy(reference, prompt, 20)
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        assert completion.logprobs is not None
        ours = [lp.logprob for lp in completion.logprobs]
        assert ours == pytest.approx(logprobs, abs=1e-4)
        assert completion.finish_reason is FinishReason.LENGTH


def test_prompt_logprobs_match_transformers(tiny_model_dir: Callable[[str], Path]) -> None:
    path = tiny_model_dir("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    # A small budget splits the prompt into chunks: every position must be scored once.
    (output,) = tiny_llm(path, max_num_batched_tokens=8).generate([PROMPTS[2]], params)
    assert output.prompt_logprobs is not None
    assert output.prompt_logprobs[0] is None
    scored = output.prompt_logprobs[1:]
    assert [lp.token_id for lp in scored if lp] == PROMPTS[2][1:]
    ours = [lp.logprob for lp in scored if lp]
    assert ours == pytest.approx(hf_prompt_logprobs(reference, PROMPTS[2]), abs=1e-4)
    assert all(lp is not None and len(lp.top_token_ids) == 2 for lp in scored)


def test_batch_invariance(tiny_model_dir: Callable[[str], Path]) -> None:
    llm = tiny_llm(tiny_model_dir("qwen3"))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    others = [[(7 * i + j) % 500 for j in range(3 + 5 * i)] for i in range(8)]
    batch = llm.generate([*others[:4], PROMPTS[0], *others[4:]], params)
    assert batch[4].outputs[0].token_ids == alone


def test_preemption_gives_the_unconstrained_outputs(tiny_model_dir: Callable[[str], Path]) -> None:
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = tiny_llm(path).generate(PROMPTS, params)
    tight_llm = tiny_llm(path, num_blocks=16, prefix_cache="off")
    tight = tight_llm.generate(PROMPTS, params)
    assert tight_llm.engine.scheduler.stats.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    assert tight_llm.engine.scheduler.kv_cache_manager.block_pool.num_used_blocks == 0


def test_prefix_cache_serves_a_repeated_prefix(tiny_model_dir: Callable[[str], Path]) -> None:
    path = tiny_model_dir("gemma3")
    prefix = [(13 * i) % 500 for i in range(64)]
    prompts = [[*prefix, 3, 4, 5], [*prefix, 6, 7]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    uncached = tiny_llm(path, prefix_cache="off")
    expected = [uncached.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    cached = tiny_llm(path)
    first = cached.generate([prompts[0]], params)[0]
    stats = cached.engine.scheduler.stats
    computed_before = stats.num_prefill_tokens
    second = cached.generate([prompts[1]], params)[0]
    assert first.outputs[0].token_ids == expected[0]
    assert second.outputs[0].token_ids == expected[1]
    assert second.num_cached_tokens == 64
    assert stats.num_prefix_hits == 64
    assert stats.num_prefill_tokens - computed_before == len(prompts[1]) - 64


def test_seed_stop_tokens_and_max_tokens(tiny_model_dir: Callable[[str], Path]) -> None:
    llm = tiny_llm(tiny_model_dir("qwen2"))
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=12, temperature=1.0), seeded]
    )
    assert mixed[1].outputs[0].token_ids == alone
    stop_at = alone[3]
    stopped = llm.generate(
        [PROMPTS[1]],
        SamplingParams(max_tokens=12, temperature=1.0, seed=42, stop_token_ids=(stop_at,)),
    )[0].outputs[0]
    assert stopped.token_ids == alone[: alone.index(stop_at) + 1]
    assert stopped.finish_reason is FinishReason.STOP


def test_requests_that_cannot_fit_fail_alone(tiny_model_dir: Callable[[str], Path]) -> None:
    llm = tiny_llm(tiny_model_dir("llama"), max_model_len=64, num_blocks=8)
    params = SamplingParams(max_tokens=8, temperature=0)
    outputs = llm.generate(
        [PROMPTS[0], list(range(60)), [1, 2, 3, 4, 5], [10_000]],
        [params, params, SamplingParams(max_tokens=40), params],
    )
    assert outputs[0].outputs[0].finish_reason is not FinishReason.ERROR
    assert outputs[1].outputs[0].finish_reason is FinishReason.ERROR
    assert "context length of 64" in (outputs[1].outputs[0].error or "")
    assert outputs[2].outputs[0].finish_reason is FinishReason.ERROR
    assert "the pool has 8" in (outputs[2].outputs[0].error or "")
    assert "outside the vocabulary" in (outputs[3].outputs[0].error or "")
    assert llm.engine.scheduler.kv_cache_manager.block_pool.num_used_blocks == 0
