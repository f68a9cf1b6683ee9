"""Gemma 3 (text): sandwich-normed decoder with local (sliding) and global layers.

Differences from Llama, all carried by `ArchConfig`: RMSNorm scales by (1 + w); a norm after
attention and after the MLP as well as before; QK norm; scores scaled by
query_pre_attn_scalar^-0.5; embeddings times sqrt(hidden_size); local and global layers
with their own rope base; gelu (tanh) MLP; tied embeddings; optional final-logit softcapping.
"""

import torch

from enduro.models.arch_config import ArchConfig
from enduro.models.base import CausalLM
from enduro.models.decoder_layers import SandwichNormDecoderLayer
from enduro.models.weight_loader import CheckpointNames

_ATTN = "model.layers.{i}.self_attn"
CHECKPOINT_NAMES: CheckpointNames = {
    "model.embed_tokens.weight": ("embed_tokens.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.input_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.post_attn_norm.weight", None),
    "model.layers.{i}.pre_feedforward_layernorm.weight": ("layers.{i}.pre_mlp_norm.weight", None),
    "model.layers.{i}.post_feedforward_layernorm.weight": ("layers.{i}.post_mlp_norm.weight", None),
    f"{_ATTN}.q_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 0),
    f"{_ATTN}.k_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 1),
    f"{_ATTN}.v_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 2),
    f"{_ATTN}.q_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 0),
    f"{_ATTN}.k_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 1),
    f"{_ATTN}.v_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 2),
    f"{_ATTN}.o_proj.weight": ("layers.{i}.self_attn.o_proj.weight", None),
    f"{_ATTN}.o_proj.bias": ("layers.{i}.self_attn.o_proj.bias", None),
    f"{_ATTN}.q_norm.weight": ("layers.{i}.self_attn.q_norm.weight", None),
    f"{_ATTN}.k_norm.weight": ("layers.{i}.self_attn.k_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.mlp.gate_up_proj.weight", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.mlp.gate_up_proj.weight", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.mlp.down_proj.weight", None),
}


class Gemma3ForCausalLM(CausalLM):
    checkpoint_names = CHECKPOINT_NAMES

    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__(
            arch, dtype, [SandwichNormDecoderLayer(arch, i) for i in range(arch.num_layers)]
        )
