"""Tiny random-weight models of every supported architecture, built from transformers configs.

Each is saved as an HF directory (config.json + model.safetensors) once per test session, so
tests load them through enduro's real loading path and compare against transformers.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    Gemma3TextConfig,
    Glm4Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3", "glm4")

_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_config(arch: str) -> PretrainedConfig:
    """A small config that still exercises every feature flag of the architecture."""
    if arch == "gemma3":
        return Gemma3TextConfig(
            **_COMMON,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
    if arch == "llama":
        return LlamaConfig(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, tie_word_embeddings=True)
    if arch == "glm4":
        return Glm4Config(**_COMMON, tie_word_embeddings=False)
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_hf_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model with random weights, in fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 (or 0 for Gemma's 1 + w); perturb them so a wrong norm
    # convention cannot pass the parity tests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny tokenizer for tests.",
    "Once upon a time there was a server that ran for weeks without slowing down.",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 emoji",
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose ids fit the tiny models (pad 0, bos 1, eos 2, < 512).

    Byte level, so any text round-trips, multi-byte characters included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(TOKENIZER_CORPUS) * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(arch)` → an HF directory (weights + tokenizer) of that architecture,
    built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            build_tiny_hf_model(arch).save_pretrained(path, safe_serialization=True)
            build_tiny_tokenizer().save_pretrained(path)
            built[arch] = path
        return built[arch]

    return get
