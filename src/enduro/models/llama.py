"""Llama, Qwen2 and Qwen3: one pre-norm decoder; the differences are flags in `ArchConfig`.

Qwen2 adds a bias to q/k/v (`qkv_bias`), Qwen3 normalises q and k per head (`qk_norm`).
"""

import torch
from torch import nn

from enduro.models.arch_config import ArchConfig
from enduro.models.attention import Attention, KVCache
from enduro.models.attention_metadata import AttentionMetadata
from enduro.models.base import CausalLM
from enduro.models.layers import GatedMLP, RMSNorm
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


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(
            arch.hidden_size,
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
            scale=arch.attn_scale,
            sliding_window=arch.sliding_windows[layer],
            qkv_bias=arch.qkv_bias,
            o_proj_bias=arch.o_proj_bias,
            qk_norm=arch.qk_norm,
            norm_eps=arch.rms_norm_eps,
        )
        self.mlp_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(
            arch.hidden_size, arch.intermediate_size, arch.hidden_act, arch.mlp_bias
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_norm(x), rope, attn, kv_cache)
        return h + self.mlp(self.mlp_norm(h))


class LlamaForCausalLM(CausalLM):
    checkpoint_names = CHECKPOINT_NAMES

    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__(arch, dtype, [LlamaDecoderLayer(arch, i) for i in range(arch.num_layers)])
