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
