"""A tiny Llama with Llama 3 rope scaling, for parity tests of the HF and GGUF paths.

With head_dim 16 and theta 5e5 the 8 wavelengths 2π·theta^(2i/16) are 6.3, 32, 167, ... An
original length of 64 puts the first under 64 / high_freq_factor = 16 (kept), the second between
16 and 64 / low_freq_factor = 64 (blended) and the other six above 64 (divided by factor), so all
three bands of the scaling are exercised.
"""

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import tiny_config

LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
KEPT, BLENDED, DIVIDED = slice(0, 1), slice(1, 2), slice(2, 8)  # the bands, by frequency index


def tiny_llama3_config() -> LlamaConfig:
    return LlamaConfig.from_dict({**tiny_config("llama").to_dict(), "rope_parameters": LLAMA3_ROPE})


def build_tiny_llama3(seed: int = 0) -> LlamaForCausalLM:
    """Random fp32 weights in eval mode, norms perturbed as conftest's tiny models are."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama3_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def unscaled_inv_freq() -> torch.Tensor:
    """theta^(-2i/16): the frequencies before scaling."""
    return 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
