"""GGUF metadata → a transformers-shaped config dict (transformers 5's `rope_parameters` form).

A GGUF file carries no config.json: its `{arch}.*` keys are the config, under llama.cpp's names.
Where llama.cpp hard-codes a value instead of reading it (Gemma 3's layer pattern and local rope
base), the hard-coded value is the default here and a key in the file overrides it. One tensor
is config too: Llama 3 rope scaling, which llama.cpp stores as per-frequency divisors.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_names import ARCHITECTURES, ROPE_FREQS, ArchitectureNames
from enduro.loading.gguf_reader import GGUFFile

# llama.cpp: Gemma 3 runs every 6th layer with full attention and the rest in a sliding window
# with rope base 10000, whatever the file says (it writes neither).
GEMMA3_SLIDING_WINDOW_PERIOD = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class _Metadata:
    """Typed reads of one file's `{arch}.*` keys, failing with the file and key named."""

    gguf: GGUFFile
    arch: str

    def get(self, key: str) -> Any:
        return self.gguf.metadata.get(f"{self.arch}.{key}")

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array whose layers all agree
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.bad(key, value, "a non-negative integer")
        return value

    def real(self, key: str, default: float | None = None) -> float:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.bad(key, value, "a number")
        return float(value)

    def bad(self, key: str, value: Any, expected: str) -> ModelLoadError:
        found = "missing" if value is None else f"{value!r}"
        return ModelLoadError(
            f"{self.gguf.path}: metadata {self.arch}.{key} is {found}, expected {expected}"
        )


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The transformers config dict of a GGUF file of a supported architecture."""
    arch = architecture_of(gguf)
    meta = _Metadata(gguf, arch)
    config = _common_config(meta, ARCHITECTURES[arch])
    config.update(_ARCHITECTURE_CONFIGS[arch](meta, config))
    return config


def architecture_of(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"{gguf.path}: architecture {arch!r} is not supported ({supported})")
    return str(arch)


def _common_config(meta: _Metadata, names: ArchitectureNames) -> dict[str, Any]:
    hidden_size = meta.integer("embedding_length")
    num_heads = meta.integer("attention.head_count")
    if num_heads == 0:
        raise meta.bad("attention.head_count", 0, "at least one head")
    num_kv_heads = meta.integer("attention.head_count_kv", default=num_heads)
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise meta.bad("attention.head_count_kv", num_kv_heads, f"a divisor of {num_heads}")
    head_dim = meta.integer("attention.key_length", default=hidden_size // num_heads)
    if head_dim == 0 or head_dim % 2:
        raise meta.bad("attention.key_length", head_dim, "a positive even head size")
    tensor_names = {info.name for info in meta.gguf.tensors}
    return {
        "architectures": [names.hf_architecture],
        "model_type": names.model_type,
        "vocab_size": _vocab_size(meta.gguf),
        "hidden_size": hidden_size,
        "intermediate_size": meta.integer("feed_forward_length"),
        "num_hidden_layers": meta.integer("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.real("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta.integer("context_length"),
        # llama.cpp writes output.weight only when the output projection is not the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        **_special_token_ids(meta.gguf),
    }


def _vocab_size(gguf: GGUFFile) -> int:
    """The embedding's row count: the vocabulary the weights were trained with.

    It equals the tokenizer's token count in files llama.cpp writes (its converter pads or trims
    the token list to match), and it is what the weights need when the two differ.
    """
    embedding = next((info for info in gguf.tensors if info.name == "token_embd.weight"), None)
    if embedding is not None:
        return embedding.shape[0]
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise ModelLoadError(f"{gguf.path}: has neither token_embd.weight nor a token list")
    return len(tokens)


def _special_token_ids(gguf: GGUFFile) -> dict[str, Any]:
    ids = {
        key: gguf.metadata.get(f"tokenizer.ggml.{name}")
        for key, name in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        )
    }
    # llama.cpp ends generation on any end-of-generation token; a chat model's turn ends with eot.
    stops = [ids["eos_token_id"]] + [
        gguf.metadata.get(f"tokenizer.ggml.{name}") for name in ("eot_token_id", "eom_token_id")
    ]
    for token_id in [*ids.values(), *stops]:
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise ModelLoadError(f"{gguf.path}: special token id {token_id!r} is not an integer")
    distinct = list(dict.fromkeys(stop for stop in stops if stop is not None))
    if len(distinct) > 1:
        ids["eos_token_id"] = distinct
    return ids


def _rope_parameters(meta: _Metadata, theta: float) -> dict[str, Any]:
    """One rope's parameters, with the file's scaling (llama.cpp's rope.scaling.* keys)."""
    scaling = meta.get("rope.scaling.type")
    if scaling in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    if scaling not in ("linear", "yarn"):
        raise meta.bad("rope.scaling.type", scaling, "none, linear or yarn")
    factor = meta.real("rope.scaling.factor")
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    original = meta.integer("rope.scaling.original_context_length")
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
    }


def _has_bias(meta: _Metadata) -> bool:
    return any(info.name == "blk.0.attn_q.bias" for info in meta.gguf.tensors)


def _llama_like(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    theta = meta.real("rope.freq_base", DEFAULT_ROPE_THETA)
    return {
        "hidden_act": "silu",
        "attention_bias": _has_bias(meta),
        "rope_parameters": _rope_parameters(meta, theta),
    }


def _llama(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    config = _llama_like(meta, common)
    divisors = _rope_freq_divisors(meta, common["head_dim"] // 2)
    if divisors is not None:
        theta = config["rope_parameters"]["rope_theta"]
        config["rope_parameters"] = _divisor_rope(meta, theta, divisors)
    return config


def _rope_freq_divisors(meta: _Metadata, num_frequencies: int) -> list[float] | None:
    """The values of llama.cpp's rope_freqs tensor, which divide the rope frequencies one by one.

    llama.cpp's converter stores Llama 3 rope scaling this way instead of as parameters.
    """
    info = next((info for info in meta.gguf.tensors if info.name == ROPE_FREQS), None)
    if info is None:
        return None
    is_f32_vector = info.ggml_type == GGMLQuantizationType.F32 and info.shape == (num_frequencies,)
    values = meta.gguf.tensor_bytes(info).view("<f4") if is_f32_vector else None
    if values is None or not np.all(np.isfinite(values) & (values > 0)):
        raise ModelLoadError(
            f"{meta.gguf.path}: tensor {ROPE_FREQS!r} is {info.ggml_type.name} of shape "
            f"{list(info.shape)}, expected {num_frequencies} positive F32 values"
        )
    return [float(value) for value in values]


def _divisor_rope(meta: _Metadata, theta: float, divisors: list[float]) -> dict[str, Any]:
    """Per-frequency divisors as transformers rope parameters.

    transformers names no rope type for them, but its "longrope" with equal short and long
    factors and attention_factor 1 computes inv_freq[i] = 1 / (divisors[i] * theta^(2i/d)) at
    every length, which is llama.cpp's rope. enduro's ArchConfig accepts exactly that case, and
    the config stays loadable by transformers (tests and benchmarks compare against it).
    """
    scaling = meta.get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise meta.bad("rope.scaling.type", scaling, f"none in a file with {ROPE_FREQS}")
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "short_factor": divisors,
        "long_factor": divisors,
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": meta.integer("context_length"),
    }


def _qwen2(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    config = _llama_like(meta, common)
    del config["attention_bias"]  # Qwen2 always has q/k/v biases; its config has no flag
    return config


def _glm4(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    config = _llama_like(meta, common)
    # GLM-4 rotates only part of each head; llama.cpp states the rotated width in dimensions.
    rotary_dims = meta.integer("rope.dimension_count", default=common["head_dim"] // 2)
    config["rope_parameters"]["partial_rotary_factor"] = rotary_dims / common["head_dim"]
    return config


def _gemma3(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    num_layers = common["num_hidden_layers"]
    global_rope = _rope_parameters(meta, meta.real("rope.freq_base", 1_000_000.0))
    local_theta = meta.real("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA)
    config: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma3_query_scale(common),
        "sliding_window": meta.integer("attention.sliding_window"),
        "layer_types": _gemma3_layer_types(meta, num_layers),
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        "attention_bias": _has_bias(meta),
    }
    if meta.get("final_logit_softcapping") is not None:
        config["final_logit_softcapping"] = meta.real("final_logit_softcapping")
    return config


def _gemma3_query_scale(common: dict[str, Any]) -> int:
    """Queries are scaled by 1/sqrt(query_pre_attn_scalar); llama.cpp does not store it.

    It is the head dim in every Gemma 3 but the 27B (62 layers), whose scalar is hidden/heads.
    """
    if common["num_hidden_layers"] == 62:
        return int(common["hidden_size"] // common["num_attention_heads"])
    return int(common["head_dim"])


def _gemma3_layer_types(meta: _Metadata, num_layers: int) -> list[str]:
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one bool per layer: True means sliding window
        if len(pattern) != num_layers or not all(isinstance(p, bool) for p in pattern):
            raise meta.bad("attention.sliding_window_pattern", pattern, f"{num_layers} booleans")
        sliding = pattern
    else:
        period = meta.integer("attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PERIOD)
        sliding = [period == 0 or layer % period < period - 1 for layer in range(num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


_ARCHITECTURE_CONFIGS: dict[str, Callable[[_Metadata, dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _llama_like,
    "glm4": _glm4,
    "gemma3": _gemma3,
}
