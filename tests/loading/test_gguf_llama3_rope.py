"""A Llama 3 GGUF, its rope scaling stored as llama.cpp stores it, against transformers."""

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from enduro.loading.loader import open_model
from enduro.models.arch_config import ArchConfig
from enduro.models.registry import build_model
from enduro.models.rope_config import FrequencyDivisors
from enduro.models.rotary import RotaryEmbedding
from tests.loading.gguf_writer import llama3_rope_divisors, write_tiny_gguf
from tests.models.test_model_parity import (
    PROMPT_LENS,
    TOLERANCE,
    generate,
    max_diff_to_transformers,
    random_prompts,
)
from tests.models.tiny_llama3 import build_tiny_llama3


def test_llama3_gguf_matches_transformers(tmp_path: Path) -> None:
    reference = build_tiny_llama3()
    path = write_tiny_gguf(reference, reference.config, tmp_path / "llama3.gguf", "llama")
    files = open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")
    divisors = llama3_rope_divisors(reference.config).tolist()
    assert files.hf_config["rope_parameters"] == {
        "rope_type": "longrope",
        "rope_theta": 500000.0,
        "short_factor": divisors,
        "long_factor": divisors,
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": 1024,
    }
    assert files.num_weights == len(reference.state_dict())  # rope_freqs is config, not weight

    arch = ArchConfig.from_hf_config(files.hf_config)
    assert arch.ropes[0].scaling == FrequencyDivisors(tuple(divisors))
    model = build_model(arch, torch.float32)
    model.load_weights(files.weights())
    # transformers reads the loader's config as the same rope, bit for bit ...
    (rotary,) = model.rotary_embs
    assert isinstance(rotary, RotaryEmbedding)
    hf_config = AutoConfig.for_model(**files.hf_config)
    assert torch.equal(rotary.inv_freq, ROPE_INIT_FUNCTIONS["longrope"](hf_config)[0])
    # ... which is the llama3 rope up to float32 rounding of the divisors.
    llama3_inv_freq = reference.model.rotary_emb.inv_freq
    assert torch.allclose(rotary.inv_freq, llama3_inv_freq, rtol=1e-6, atol=0)

    prompts = random_prompts(arch.vocab_size, PROMPT_LENS)
    sequences, ours = generate(model, prompts)
    assert max_diff_to_transformers(reference, prompts, sequences, ours) < TOLERANCE
