"""ArchConfig.from_hf_config on real-world config.json layouts, old and new."""

from typing import Any

import pytest

from enduro.models.arch_config import ArchConfig
from enduro.models.rope_config import (
    FrequencyDivisors,
    LinearScaling,
    Llama3Scaling,
    RopeConfig,
)

# Gemma 3 270M as published (transformers 4.x keys: rope_theta, rope_local_base_freq,
# rope_scaling), minus layer_types so the 5-local-1-global pattern default is exercised.
GEMMA3_270M: dict[str, Any] = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "use_bidirectional_attention": False,
    "vocab_size": 262144,
}

LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "eos_token_id": [128001, 128009],
    "vocab_size": 100,
}


def test_gemma3_270m_checkpoint_config() -> None:
    local = RopeConfig(theta=10000.0, rotary_dim=256)
    global_ = RopeConfig(theta=1000000.0, rotary_dim=256)
    assert ArchConfig.from_hf_config(GEMMA3_270M) == ArchConfig(
        architecture="gemma3",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_windows=(512, 512, 512, 512, 512, None) * 3,
        ropes=(local, local, local, local, local, global_) * 3,
        eos_token_ids=(1,),
        bos_token_id=2,
        rms_norm_eps=1e-06,
        norm_unit_offset=True,
        hidden_act="gelu_pytorch_tanh",
        qkv_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        qk_norm=True,
        tie_word_embeddings=True,
        attn_scale=0.0625,
        scale_embeddings=True,
        final_logit_softcap=None,
    )


def test_gemma3_old_linear_rope_scaling_applies_to_global_layers_only() -> None:
    config = {**GEMMA3_270M, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    ropes = ArchConfig.from_hf_config(config).ropes
    assert ropes[4] == RopeConfig(theta=10000.0, rotary_dim=256)
    assert ropes[5] == RopeConfig(theta=1000000.0, rotary_dim=256, scaling=LinearScaling(8.0))


def test_gemma3_transformers5_rope_parameters() -> None:
    config = {
        **GEMMA3_270M,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_hidden_layers": 2,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    arch = ArchConfig.from_hf_config(config)
    assert arch.sliding_windows == (512, None)
    assert arch.ropes == (
        RopeConfig(theta=1e4, rotary_dim=256),
        RopeConfig(theta=5e5, rotary_dim=256, scaling=LinearScaling(2.0)),
    )


def test_gemma3_attention_softcapping_is_refused() -> None:
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ArchConfig.from_hf_config({**GEMMA3_270M, "attn_logit_softcapping": 50.0})


def test_llama_flat_keys_and_eos_list() -> None:
    arch = ArchConfig.from_hf_config(LLAMA)
    assert arch.architecture == "llama"
    assert arch.head_dim == 16
    assert arch.num_kv_heads == 4
    assert arch.eos_token_ids == (128001, 128009)
    assert arch.bos_token_id is None
    assert arch.ropes == (RopeConfig(theta=500000.0, rotary_dim=16),) * 2
    assert arch.sliding_windows == (None, None)
    assert (arch.qkv_bias, arch.o_proj_bias, arch.qk_norm, arch.tie_word_embeddings) == (
        False,
        False,
        False,
        False,
    )


def test_llama31_published_rope_scaling() -> None:
    """Llama 3.1's config.json keeps llama3 scaling in the older `rope_scaling` key."""
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    rope = ArchConfig.from_hf_config({**LLAMA, "rope_scaling": scaling}).ropes[0]
    assert rope == RopeConfig(
        theta=500000.0, rotary_dim=16, scaling=Llama3Scaling(8.0, 1.0, 4.0, 8192)
    )


def test_llama3_original_length_defaults_as_in_transformers() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4}
    config = {**LLAMA, "rope_scaling": scaling}
    rope = ArchConfig.from_hf_config(config).ropes[0]
    assert rope.scaling == Llama3Scaling(8.0, 1.0, 4.0, 2048)  # max_position_embeddings
    with_top_level = {**config, "original_max_position_embeddings": 1024}
    assert ArchConfig.from_hf_config(with_top_level).ropes[0].scaling == Llama3Scaling(
        8.0, 1.0, 4.0, 1024
    )


def test_longrope_with_one_factor_list_is_fixed_divisors() -> None:
    divisors = [1.0, 1.0, 2.0, 2.5, 8.0, 8.0, 8.0, 8.0]
    params = {
        "rope_type": "longrope",
        "short_factor": divisors,
        "long_factor": divisors,
        "factor": 1.0,
    }
    rope = ArchConfig.from_hf_config({**LLAMA, "rope_parameters": params}).ropes[0]
    assert rope == RopeConfig(
        theta=500000.0, rotary_dim=16, scaling=FrequencyDivisors(tuple(divisors))
    )


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 1.0}, "short_factor =="),
        ({"short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "factor": 4.0}, "attention_factor"),
        ({"short_factor": [1.0] * 4, "long_factor": [1.0] * 4, "factor": 1.0}, "4 rope freq"),
        ({"short_factor": [0.0] * 8, "long_factor": [0.0] * 8, "factor": 1.0}, "positive"),
        ({"long_factor": [1.0] * 8}, "lack 'short_factor'"),
    ],
)
def test_longrope_beyond_fixed_divisors_is_refused(params: dict[str, Any], phrase: str) -> None:
    config = {**LLAMA, "rope_parameters": {"rope_type": "longrope", **params}}
    with pytest.raises(ValueError, match=phrase):
        ArchConfig.from_hf_config(config)


def test_llama3_needs_increasing_band_factors() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4, "high_freq_factor": 4}
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        ArchConfig.from_hf_config({**LLAMA, "rope_scaling": scaling})


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_type_is_refused(rope_type: str) -> None:
    config = {**LLAMA, "rope_scaling": {"rope_type": rope_type, "factor": 8.0}}
    with pytest.raises(ValueError, match=f"unsupported rope type '{rope_type}'"):
        ArchConfig.from_hf_config(config)


def test_old_style_rope_scaling_type_key() -> None:
    config = {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = ArchConfig.from_hf_config(config).ropes[0]
    assert rope == RopeConfig(theta=500000.0, rotary_dim=16, scaling=LinearScaling(2.0))


def test_glm4_old_config_has_half_interleaved_rope_and_qkv_bias_only() -> None:
    config = {
        **LLAMA,
        "architectures": ["Glm4ForCausalLM"],
        "attention_bias": True,
        "head_dim": 32,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
    }
    arch = ArchConfig.from_hf_config(config)
    assert arch.ropes[0] == RopeConfig(theta=10000.0, rotary_dim=16, interleaved=True)
    assert (arch.qkv_bias, arch.o_proj_bias) == (True, False)
    assert arch.attn_scale == 32**-0.5


def test_glm4_partial_rotary_defaults_to_half() -> None:
    config = {**LLAMA, "architectures": ["Glm4ForCausalLM"], "rope_parameters": None}
    assert ArchConfig.from_hf_config(config).ropes[0].rotary_dim == 8


def test_qwen2_sliding_window_from_max_window_layers() -> None:
    config = {
        **LLAMA,
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 4,
        "use_sliding_window": True,
        "sliding_window": 4096,
        "max_window_layers": 2,
    }
    arch = ArchConfig.from_hf_config(config)
    assert arch.sliding_windows == (None, None, 4096, 4096)
    assert (arch.qkv_bias, arch.o_proj_bias) == (True, False)


def test_qwen_sliding_window_ignored_unless_enabled() -> None:
    config = {**LLAMA, "model_type": "qwen3", "architectures": None, "sliding_window": 32768}
    arch = ArchConfig.from_hf_config(config)
    assert arch.architecture == "qwen3"
    assert arch.sliding_windows == (None, None)
    assert arch.qk_norm


@pytest.mark.parametrize("name", ["MistralForCausalLM", "Gemma3ForConditionalGeneration"])
def test_unknown_architecture_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"unsupported architecture \\['{name}'"):
        ArchConfig.from_hf_config({**LLAMA, "architectures": [name], "model_type": "x"})


def test_missing_required_key_is_named() -> None:
    config = {k: v for k, v in LLAMA.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match="lacks 'vocab_size'"):
        ArchConfig.from_hf_config(config)
