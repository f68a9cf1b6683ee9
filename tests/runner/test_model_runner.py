from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from enduro import LLM
from enduro.config import ModelConfig


def test_threads_sets_the_engine_torch_threads(tiny_model_dir: Callable[[str], Path]) -> None:
    before = torch.get_num_threads()
    try:
        LLM(str(tiny_model_dir("llama")), threads=1, num_blocks=16)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ModelConfig(threads=0)


def test_half_precision_engines_build_every_matmul_shape_at_start(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="bfloat16", num_blocks=16, max_num_batched_tokens=40, max_num_seqs=4)
    # Four projection shapes (qkv, o, gate|up, down) at the 18 buckets of 1..40 rows; the
    # untied output projection at the 19 of 1..64 (prompt logprobs score 64 rows at a time).
    assert llm.engine.runner.num_warm_up_matmuls == 4 * 18 + 19
    fp32 = LLM(path, dtype="float32", num_blocks=16)
    assert fp32.engine.runner.num_warm_up_matmuls == 0


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_the_native_decode_attention_gives_the_logits_of_torch_attention(
    arch: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    from enduro.native import use_native
    from enduro.runner.attention_inputs import build_attention_metadata

    llm = LLM(str(tiny_model_dir(arch)), dtype="bfloat16", num_blocks=64)
    runner = llm.engine.runner
    assert runner.native_kernels
    model, kv, windows = runner.model, runner.kv_cache.layers, runner.windows
    # Two requests, 37 and 70 tokens of context (past Gemma 3's tiny sliding window), in
    # blocks out of order; prefill both, then one decode step with each attention.
    tables = [[9, 2, 30], [4, 40, 11, 5, 21]]
    lens = [37, 70]
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 500, (n + 1,), generator=generator) for n in lens]
    attn, positions = build_attention_metadata(lens, lens, tables, 16, windows)
    with torch.inference_mode():
        model(torch.cat([i[:-1] for i in ids]), positions, attn, kv)
        step, positions = build_attention_metadata(
            [1, 1], [n + 1 for n in lens], tables, 16, windows
        )
        step_ids = torch.stack([i[-1] for i in ids])
        logits = {}
        try:
            for on in (False, True):
                use_native(on)
                hidden = model(step_ids, positions, step, kv)
                logits[on] = model.compute_logits(hidden)
        finally:
            use_native(True)
    # bf16 rounding differs at the attention output, then flows through the later layers:
    # measured 0.0039–0.0044 on logits of magnitude 0.5–1.2.
    scale = float(logits[False].abs().max())
    assert float((logits[True] - logits[False]).abs().max()) <= 0.02 * max(scale, 1.0)
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
