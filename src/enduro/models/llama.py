"""Llama, Qwen2 and Qwen3: one pre-norm decoder; the differences are flags in `ArchConfig`.

Qwen2 adds a bias to q/k/v (`qkv_bias`), Qwen3 normalises q and k per head (`qk_norm`).
"""

import torch

from enduro.models.arch_config import ArchConfig
from enduro.models.base import CausalLM
from enduro.models.decoder_layers import PreNormDecoderLayer
from enduro.models.weight_loader import CheckpointNames

CHECKPOINT_NAMES: CheckpointNames = {
    "model.embed_tokens.weight": ("embed_tokens.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.input_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.mlp_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 2),
    "model.layers.{i}.self_attn.q_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 0),
    "model.layers.{i}.self_attn.k_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 1),
    "model.layers.{i}.self_attn.v_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.self_attn.o_proj.weight", None),
    "model.layers.{i}.self_attn.o_proj.bias": ("layers.{i}.self_attn.o_proj.bias", None),
    "model.layers.{i}.self_attn.q_norm.weight": ("layers.{i}.self_attn.q_norm.weight", None),
    "model.layers.{i}.self_attn.k_norm.weight": ("layers.{i}.self_attn.k_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.mlp.gate_up_proj.weight", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.mlp.gate_up_proj.weight", 1),
    "model.layers.{i}.mlp.gate_proj.bias": ("layers.{i}.mlp.gate_up_proj.bias", 0),
    "model.layers.{i}.mlp.up_proj.bias": ("layers.{i}.mlp.gate_up_proj.bias", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.mlp.down_proj.weight", None),
    "model.layers.{i}.mlp.down_proj.bias": ("layers.{i}.mlp.down_proj.bias", None),
}


class LlamaForCausalLM(CausalLM):
    checkpoint_names = CHECKPOINT_NAMES

    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__(
            arch, dtype, [PreNormDecoderLayer(arch, i) for i in range(arch.num_layers)]
        )
