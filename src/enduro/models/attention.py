"""Self-attention over the paged KV cache.

A step's T new tokens arrive flat (request after request). Their K/V are written into the
cache slots `attn.slot_mapping` names; then every request's context is gathered through its
block table, the queries are scattered into a padded [R, max_query_len] layout, and one
batched attention call covers all requests. In bf16 on CPU, native kernels read the blocks
in place instead: one for decode steps (one query per request), one for prompt chunks
(causal, scoring only the keys each query sees). A step mixing one-token queries with
prompt chunks attends in those two parts (`AttentionMetadata.parts`). Sliding-window layers
keep their full KV in the cache but gather only the blocks their window can reach
(`attn.block_tables[window]`); the mask does the exact windowing.

Invariant: the cache must hold finite values everywhere (allocate it with zeros). Keys past a
request's length are masked, but their values still enter the softmax-weighted sum with weight
0, and 0 * NaN is NaN.
"""

import torch
import torch.nn.functional as F
from torch import nn

from enduro import native
from enduro.models import fused
from enduro.models.attention_metadata import AttentionMetadata
from enduro.models.layers import Linear, MergedLinear, RMSNorm

KVCache = tuple[torch.Tensor, torch.Tensor]


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks `tables` [R, num_blocks] names, as [R, Hkv, num_blocks * block_size, D].

    index_select copies each block as one contiguous run; indexing with the 2-D table
    (cache[tables]) copies element by element and costs 4–7× more here, 20 ms of a 16-stream
    decode step over 36 gathers."""
    blocks = torch.index_select(cache, 0, tables.flatten())
    return blocks.view(*tables.shape, *cache.shape[1:]).flatten(1, 2).transpose(1, 2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    attn: AttentionMetadata,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Write k/v into the cache, attend q to each request's context; returns [T, Hq * D].

    q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].
    """
    k_cache, v_cache = kv_cache
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, attn.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, attn.slot_mapping, v)
    if not attn.parts:
        return attend(q, kv_cache, attn, sliding_window, scale)
    # A mixed step: its decode requests and its prompt chunks each attend in their own call.
    out = q.new_empty(q.shape[0], num_heads * head_dim)
    for part in attn.parts:
        out[part.tokens] = attend(q[part.tokens], kv_cache, part.metadata, sliding_window, scale)
    return out


def attend(
    q: torch.Tensor,
    kv_cache: KVCache,
    attn: AttentionMetadata,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] to the contexts in the cache (this step's K/V written) of
    requests attended in one call (`attn` has no parts); returns [T, Hq * D]."""
    k_cache, v_cache = kv_cache
    num_heads, head_dim = q.shape[1:]
    num_requests, max_query_len = attn.num_requests, attn.max_query_len
    library = native.load() if q.dtype == torch.bfloat16 and q.device.type == "cpu" else None
    if library is not None:
        return native_attention(library, q, kv_cache, attn, sliding_window, scale)
    # [R, num_blocks, block_size, Hkv, D] → [R, Hkv, S, D], S = num_blocks * block_size; a
    # sliding-window layer's tables start near the window, a global layer's at block 0.
    tables = attn.block_tables[sliding_window]
    keys = gather_blocks(k_cache, tables)
    values = gather_blocks(v_cache, tables)
    mask = attn.masks[sliding_window]  # [R, 1, max_query_len, S], True = may attend
    if max_query_len == 1:
        # A pure decode step: one token per request, already in request order, so there is
        # nothing to pad: [T = R, Hq, D] → [R, Hq, 1, D] and back are views.
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.reshape(num_requests, num_heads * head_dim)
    # [T, Hq, D] → [R, Hq, max_query_len, D]; padding rows stay zero.
    q_padded = q.new_zeros(num_requests * max_query_len, num_heads, head_dim)
    q_padded[attn.padded_index] = q
    q_padded = q_padded.view(num_requests, max_query_len, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q_padded, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [R, Hq, max_query_len, D]
    # [R, Hq, max_query_len, D] → [R * max_query_len, Hq * D] → [T, Hq * D]
    out = out.transpose(1, 2).reshape(num_requests * max_query_len, num_heads * head_dim)
    return out[attn.padded_index]


def native_attention(
    library: native.Library,
    q: torch.Tensor,
    kv_cache: KVCache,
    attn: AttentionMetadata,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention in enduro's native kernels, read straight from the blocks (no padded layout,
    mask or gathered copy); q [T, Hq, D] → [T, Hq * D], bf16 on CPU. A pure decode step (one
    query per request) takes the decode kernel, with each request's first visible key; prompt
    chunks the causal prefill kernel, with each request's tokens and the window."""
    k_cache, v_cache = kv_cache
    num_tokens, num_heads, head_dim = q.shape
    request_args: tuple[int, ...]
    if attn.max_query_len == 1:
        kernel = library.decode_attention
        request_args = (attn.key_starts[sliding_window].data_ptr(), attn.seq_lens.data_ptr())
    else:
        kernel = library.prefill_attention
        request_args = (
            attn.query_start_loc.data_ptr(),
            attn.seq_lens.data_ptr(),
            sliding_window or 0,
        )
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = attn.block_tables[sliding_window]
    status = kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        attn.table_starts[sliding_window].data_ptr(),
        *request_args,
        attn.num_requests,
        num_heads,
        k_cache.shape[2],
        head_dim,
        k_cache.shape[1],
        scale,
        out.data_ptr(),
    )
    if status != 0:
        raise MemoryError("attention: scratch memory could not be allocated")
    return out.view(num_tokens, num_heads * head_dim)


class Attention(nn.Module):
    """q/k/v projection (one matmul), optional QK norm, rope, paged attention, output projection."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        sliding_window: int | None = None,
        qkv_bias: bool = False,
        o_proj_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_unit_offset: bool = False,
        rope_interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.rope_interleaved = rope_interleaved
        self.norm_eps, self.norm_unit_offset = norm_eps, norm_unit_offset
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # Kept here rather than read from qkv_proj, which quantization may replace.
        self.qkv_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = MergedLinear(hidden_size, self.qkv_sizes, bias=qkv_bias)
        self.o_proj = Linear(q_size, hidden_size, bias=o_proj_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_unit_offset) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_unit_offset) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        # x: [T, hidden]; rope: cos, sin [T, rotary_dim / 2] at each token's position
        cos, sin = rope
        q, k, v = fused.ops.qk_norm_rotary(
            self.qkv_proj(x),
            self.qkv_sizes,
            self.head_dim,
            cos,
            sin,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.norm_eps,
            self.norm_unit_offset,
            self.rope_interleaved,
        )
        out = paged_attention(q, k, v, kv_cache, attn, self.sliding_window, self.scale)
        return self.o_proj(out)
