"""GLM-4 (transformers' Glm4ForCausalLM): sandwich-normed decoder with partial, interleaved rope.

Differences from Llama: a norm after attention (`post_self_attn_layernorm`) and after the MLP
(`post_mlp_layernorm`) besides the usual two; q/k/v bias; rope on the first half of each head
only, rotating adjacent pairs (2i, 2i + 1); gate and up already fused in the checkpoint.
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
    "model.layers.{i}.post_self_attn_layernorm.weight": ("layers.{i}.post_attn_norm.weight", None),
    # Despite its name, transformers' post_attention_layernorm is the norm before the MLP.
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.pre_mlp_norm.weight", None),
    "model.layers.{i}.post_mlp_layernorm.weight": ("layers.{i}.post_mlp_norm.weight", None),
    f"{_ATTN}.q_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 0),
    f"{_ATTN}.k_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 1),
    f"{_ATTN}.v_proj.weight": ("layers.{i}.self_attn.qkv_proj.weight", 2),
    f"{_ATTN}.q_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 0),
    f"{_ATTN}.k_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 1),
    f"{_ATTN}.v_proj.bias": ("layers.{i}.self_attn.qkv_proj.bias", 2),
    f"{_ATTN}.o_proj.weight": ("layers.{i}.self_attn.o_proj.weight", None),
    # Already fused as [gate; up] on the output dim, the layout GatedMLP uses.
    "model.layers.{i}.mlp.gate_up_proj.weight": ("layers.{i}.mlp.gate_up_proj.weight", None),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.mlp.down_proj.weight", None),
}


class Glm4ForCausalLM(CausalLM):
    checkpoint_names = CHECKPOINT_NAMES

    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__(
            arch, dtype, [SandwichNormDecoderLayer(arch, i) for i in range(arch.num_layers)]
        )
