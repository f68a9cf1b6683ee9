"""GGUF metadata → config: llama.cpp's defaults, and clear errors for what cannot be honoured."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_config import hf_config_from_gguf
from enduro.loading.gguf_reader import read_gguf
from enduro.loading.loader import open_model

_LLAMA_KEYS: dict[str, int | float | str] = {
    "block_count": 1,
    "context_length": 64,
    "embedding_length": 8,
    "feed_forward_length": 16,
    "attention.head_count": 2,
    "attention.layer_norm_rms_epsilon": 1e-5,
}

_LINEAR_ROPE: dict[str, int | float | str] = {
    "rope.scaling.type": "linear",
    "rope.scaling.factor": 2.0,
}


def _write(
    path: Path,
    arch: str,
    keys: dict[str, int | float | str],
    extra_tensors: tuple[str, ...] = (),
    rope_freqs: list[float] | None = None,
) -> Path:
    """A GGUF file with `{arch}.{key}` metadata, an embedding, small F32 `extra_tensors` (4 x 8
    zeros each) and, when given, a rope_freqs.weight vector."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        full_key = (
            key if "." in key and key.split(".")[0] in ("split", "general") else f"{arch}.{key}"
        )
        if isinstance(value, str):
            writer.add_string(full_key, value)
        elif isinstance(value, float):
            writer.add_float32(full_key, value)
        else:
            writer.add_uint32(full_key, value)
    for name in ("token_embd.weight", *extra_tensors):
        writer.add_tensor(name, np.zeros((4, 8), dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.array(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_llama_defaults(tmp_path: Path) -> None:
    config = hf_config_from_gguf(read_gguf(_write(tmp_path / "m.gguf", "llama", _LLAMA_KEYS)))
    assert config["num_key_value_heads"] == 2  # no head_count_kv: one KV head per query head
    assert config["head_dim"] == 4  # no key_length: hidden / heads
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["rms_norm_eps"] == 1e-5
    assert config["vocab_size"] == 4  # the embedding's rows
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] is None


def test_rope_scaling_and_end_of_turn_tokens(tmp_path: Path) -> None:
    keys = _LLAMA_KEYS | {
        "rope.freq_base": 500000.0,
        "rope.scaling.type": "linear",
        "rope.scaling.factor": 4.0,
    }
    path = _write(tmp_path / "m.gguf", "llama", keys)
    config = hf_config_from_gguf(read_gguf(path))
    assert config["rope_parameters"] == {
        "rope_type": "linear",
        "rope_theta": 500000.0,
        "factor": 4.0,
    }


def test_llama_rope_freqs_become_fixed_longrope(tmp_path: Path) -> None:
    keys = _LLAMA_KEYS | {"rope.freq_base": 500000.0}
    path = _write(tmp_path / "m.gguf", "llama", keys, rope_freqs=[1.0, 2.5])
    config = hf_config_from_gguf(read_gguf(path))
    assert config["rope_parameters"] == {
        "rope_type": "longrope",
        "rope_theta": 500000.0,
        "short_factor": [1.0, 2.5],
        "long_factor": [1.0, 2.5],
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": 64,
    }


@pytest.mark.parametrize(
    ("arch", "keys", "rope_freqs", "phrase"),
    [
        ("llama", _LLAMA_KEYS, [1.0, 2.0, 3.0], "expected 2 positive F32 values"),
        ("llama", _LLAMA_KEYS, [1.0, -2.0], "expected 2 positive F32 values"),
        ("llama", _LLAMA_KEYS | _LINEAR_ROPE, [1.0, 2.0], "linear', expected none in a file"),
        ("qwen2", _LLAMA_KEYS, [1.0, 2.0], "'rope_freqs.weight' has no transformers"),
    ],
)
def test_unusable_rope_freqs(
    tmp_path: Path,
    arch: str,
    keys: dict[str, int | float | str],
    rope_freqs: list[float],
    phrase: str,
) -> None:
    path = _write(tmp_path / "bad.gguf", arch, keys, rope_freqs=rope_freqs)
    with pytest.raises(ModelLoadError) as raised:
        open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")
    assert str(path) in str(raised.value)
    assert phrase in str(raised.value)


def test_gemma3_defaults_follow_llama_cpp(tmp_path: Path) -> None:
    keys = _LLAMA_KEYS | {
        "block_count": 12,
        "attention.key_length": 4,
        "attention.sliding_window": 3,
    }
    config = hf_config_from_gguf(read_gguf(_write(tmp_path / "g.gguf", "gemma3", keys)))
    full = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    assert full == [5, 11]
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert config["query_pre_attn_scalar"] == 4


@pytest.mark.parametrize(
    ("arch", "keys", "extra_tensors", "phrase"),
    [
        ("phi3", _LLAMA_KEYS, (), "architecture 'phi3' is not supported"),
        ("llama", {"block_count": 1}, (), "embedding_length is missing"),
        ("llama", _LLAMA_KEYS | {"attention.head_count_kv": 3}, (), "a divisor of 2"),
        ("llama", _LLAMA_KEYS | {"rope.scaling.type": "longrope"}, (), "none, linear or yarn"),
        ("llama", _LLAMA_KEYS | {"block_count": "one"}, (), "expected a non-negative integer"),
        ("llama", _LLAMA_KEYS, ("rope_freqs.weight",), "of shape [4, 8], expected 2 positive"),
        ("llama", _LLAMA_KEYS, ("blk.0.rope_freqs.weight",), "has no transformers counterpart"),
        ("llama", _LLAMA_KEYS | {"split.count": 2}, (), "split in 2 files"),
    ],
)
def test_unloadable_metadata(
    tmp_path: Path,
    arch: str,
    keys: dict[str, int | float | str],
    extra_tensors: tuple[str, ...],
    phrase: str,
) -> None:
    path = _write(tmp_path / "bad.gguf", arch, keys, extra_tensors)
    with pytest.raises(ModelLoadError) as raised:
        open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")
    assert str(path) in str(raised.value)
    assert phrase in str(raised.value)
