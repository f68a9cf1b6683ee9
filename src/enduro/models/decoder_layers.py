"""The two decoder-layer shapes every supported architecture uses; the rest are flags.

- pre-norm (Llama, Qwen2, Qwen3): x + attn(norm(x)), then h + mlp(norm(h));
- sandwich-norm (Gemma 3, GLM-4): each sublayer's output is normalised again before the
  residual add.
"""

from collections.abc import Callable

import torch
from torch import nn

from enduro import native
from enduro.models import fused
from enduro.models.arch_config import ArchConfig
from enduro.models.attention import Attention, KVCache
from enduro.models.attention_metadata import AttentionMetadata
from enduro.models.layers import GatedMLP, RMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]
# A layer's decode step in one native call (models/native_layer.py), set after loading.
NativeDecode = Callable[[torch.Tensor, Rope, AttentionMetadata, KVCache], torch.Tensor]
# Pure decode steps of up to this many requests take a layer's native path when it has one:
# its projections read each weight once for all rows, but past ≈16 rows oneDNN's bf16 GEMM
# does the arithmetic faster.
NATIVE_DECODE_MAX_ROWS = 16


def native_step(
    native_decode: NativeDecode | None, x: torch.Tensor, attn: AttentionMetadata
) -> NativeDecode | None:
    """The layer's native decode, when this step can take it (and `native.use_native` is on)."""
    if native_decode is None or attn.max_query_len != 1 or x.shape[0] > NATIVE_DECODE_MAX_ROWS:
        return None
    return native_decode if native.enabled() else None


def layer_attention(arch: ArchConfig, layer: int) -> Attention:
    """The attention of layer `layer`, every architecture difference read from `arch`."""
    return Attention(
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
        norm_unit_offset=arch.norm_unit_offset,
        rope_interleaved=arch.ropes[layer].interleaved,
    )


def layer_norm(arch: ArchConfig) -> RMSNorm:
    return RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.norm_unit_offset)


def layer_mlp(arch: ArchConfig) -> GatedMLP:
    return GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act, arch.mlp_bias)


class PreNormDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = layer_norm(arch)
        self.self_attn = layer_attention(arch, layer)
        self.mlp_norm = layer_norm(arch)
        self.mlp = layer_mlp(arch)
        self.native_decode: NativeDecode | None = None

    def forward(
        self, x: torch.Tensor, rope: Rope, attn: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        if decode := native_step(self.native_decode, x, attn):
            return decode(x, rope, attn, kv_cache)
        norm = self.mlp_norm
        h, normed = fused.ops.add_rms_norm(
            x,
            self.self_attn(self.input_norm(x), rope, attn, kv_cache),
            norm.weight,
            norm.eps,
            norm.unit_offset,
        )
        return h + self.mlp(normed)


class SandwichNormDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = layer_norm(arch)
        self.self_attn = layer_attention(arch, layer)
        self.post_attn_norm = layer_norm(arch)
        self.pre_mlp_norm = layer_norm(arch)
        self.mlp = layer_mlp(arch)
        self.post_mlp_norm = layer_norm(arch)
        self.native_decode: NativeDecode | None = None

    def forward(
        self, x: torch.Tensor, rope: Rope, attn: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        if decode := native_step(self.native_decode, x, attn):
            return decode(x, rope, attn, kv_cache)
        # One fused call per stretch between matmuls: norm the attention's output, add it
        # back, norm again for the MLP; then norm the MLP's output and add it back.
        post_attn, pre_mlp, post_mlp = self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm
        h, normed = fused.ops.add_normed_then_norm(
            x,
            self.self_attn(self.input_norm(x), rope, attn, kv_cache),
            post_attn.weight,
            pre_mlp.weight,
            post_attn.eps,
            post_attn.unit_offset,
        )
        return fused.ops.add_normed(
            h, self.mlp(normed), post_mlp.weight, post_mlp.eps, post_mlp.unit_offset
        )
