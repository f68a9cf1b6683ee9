"""RotaryEmbedding's frequencies against transformers' rope init functions, bit for bit."""

from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from enduro.models.rope_config import rope_config
from enduro.models.rotary import RotaryEmbedding

HEAD_DIM = 64


def _llama3(original: int) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }


_DIVISORS = [1.0 + i / 7 for i in range(HEAD_DIM // 2)]


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        # Original lengths that move the blended band through the 32 frequencies.
        *(_llama3(original) for original in (16, 256, 8192, 65536)),
        {
            "rope_type": "longrope",
            "short_factor": _DIVISORS,
            "long_factor": _DIVISORS,
            "factor": 1.0,
            "attention_factor": 1.0,
            "original_max_position_embeddings": 4096,
        },
    ],
)
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_inv_freq_equals_transformers(params: dict[str, Any], theta: float) -> None:
    params = {**params, "rope_theta": theta}
    config = LlamaConfig(
        hidden_size=2 * HEAD_DIM,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    expected, attention_scaling = ROPE_INIT_FUNCTIONS.get(params["rope_type"], _default)(config)
    assert attention_scaling == 1.0
    ours = RotaryEmbedding(rope_config(params, HEAD_DIM, interleaved=False)).inv_freq
    assert torch.equal(ours, expected)


def _default(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
