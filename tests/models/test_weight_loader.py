"""load_weights: assignment without copies, fused shards, and errors that name the tensor."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from enduro.models.arch_config import ArchConfig
from enduro.models.base import CausalLM
from enduro.models.registry import build_model


def built(model_dir: Path) -> tuple[CausalLM, dict[str, torch.Tensor]]:
    arch = ArchConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    return build_model(arch, torch.float32), load_file(model_dir / "model.safetensors")


def test_build_model_holds_no_memory(tiny_model_dir: Any) -> None:
    model, _ = built(tiny_model_dir("llama"))
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_tensors_are_assigned_not_copied(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("qwen3"))
    model.load_weights(weights.items())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    embedding = weights["model.embed_tokens.weight"]
    assert model.embed_tokens.weight.data_ptr() == embedding.data_ptr()
    assert model.lm_head is None  # tied: logits use the embedding itself
    q_norm = weights["model.layers.2.self_attn.q_norm.weight"]
    assert model.get_parameter("layers.2.self_attn.q_norm.weight").data_ptr() == q_norm.data_ptr()


def test_fused_projections_hold_their_shards_in_order(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("qwen2"))
    model.load_weights(weights.items())
    qkv = model.get_parameter("layers.1.self_attn.qkv_proj.weight")
    qkv_bias = model.get_parameter("layers.1.self_attn.qkv_proj.bias")
    prefix = "model.layers.1.self_attn"
    # 4 query heads and 2 KV heads of 16 dims: rows 0:64 q, 64:96 k, 96:128 v.
    assert torch.equal(qkv[:64], weights[f"{prefix}.q_proj.weight"])
    assert torch.equal(qkv[64:96], weights[f"{prefix}.k_proj.weight"])
    assert torch.equal(qkv[96:], weights[f"{prefix}.v_proj.weight"])
    assert torch.equal(qkv_bias[64:96], weights[f"{prefix}.k_proj.bias"])
    gate_up = model.get_parameter("layers.1.mlp.gate_up_proj.weight")
    assert torch.equal(gate_up[:128], weights["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[128:], weights["model.layers.1.mlp.up_proj.weight"])


def test_missing_tensor_is_named(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("qwen2"))
    del weights["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(
        ValueError, match=r"missing \['model\.layers\.1\.self_attn\.k_proj\.bias'\]"
    ):
        model.load_weights(weights.items())


def test_unexpected_tensor_is_named(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("glm4"))
    weights["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(128, 64)
    with pytest.raises(
        ValueError, match=r"unexpected \['model\.layers\.0\.mlp\.gate_proj\.weight'\]"
    ):
        model.load_weights(weights.items())


def test_misshapen_tensor_is_named(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("gemma3"))
    weights["model.layers.2.self_attn.v_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"v_proj\.weight: shape \(16, 64\), expected \(32, 64\)"):
        model.load_weights(weights.items())


def test_tied_model_drops_a_stray_lm_head(tiny_model_dir: Any) -> None:
    model, weights = built(tiny_model_dir("gemma3"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    model.load_weights(weights.items())
    assert model.lm_head is None
