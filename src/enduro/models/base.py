"""`CausalLM`: the interface the engine calls, and the body every architecture shares.

embedding → decoder layers → final norm; then `compute_logits` for the rows the sampler needs.
A model file supplies its decoder layers and its checkpoint-name map.
"""

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import nn

from enduro.models.arch_config import ArchConfig
from enduro.models.attention import KVCache
from enduro.models.attention_metadata import AttentionMetadata
from enduro.models.layers import (
    Linear,
    PackedLinear,
    RMSNorm,
    WarmsUp,
    bucketed_linear,
    pack_weight,
    warm_up_matmuls,
)
from enduro.models.rotary import RotaryEmbedding
from enduro.models.weight_loader import CheckpointNames, load_checkpoint


class CausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    Built on the meta device by `registry.build_model`; `load_weights` then assigns the real
    tensors. A model file passes its decoder layers, each called as
    `layer(hidden, (cos, sin), attn, kv_cache)`, and names its `checkpoint_names`.
    """

    checkpoint_names: ClassVar[CheckpointNames]

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.norm_unit_offset)
        # None = tied to the embedding; `quantization.quantize_model` may set a quantized copy.
        self.lm_head: nn.Module | None = (
            None
            if arch.tie_word_embeddings
            else Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        # One rotary table per distinct rope (Gemma 3: local and global), computed once a step.
        ropes = list(dict.fromkeys(arch.ropes))
        self.rotary_embs = nn.ModuleList(RotaryEmbedding(rope) for rope in ropes)
        self.rope_of_layer = [ropes.index(rope) for rope in arch.ropes]
        # Gemma rounds sqrt(hidden_size) from float32 to the model dtype before multiplying.
        self.embed_scale = (
            float(torch.tensor(arch.hidden_size**0.5, device="cpu").to(dtype))
            if arch.scale_embeddings
            else None
        )
        self.to(dtype)
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """input_ids, positions: [T] flat in request order → hidden states [T, hidden]."""
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        ropes = [rotary(positions) for rotary in self.rotary_embs]
        for layer, rope_index, kv_cache in zip(
            self.layers, self.rope_of_layer, kv_caches, strict=True
        ):
            hidden = layer(hidden, ropes[rope_index], attn, kv_cache)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """hidden: [N, hidden] → logits [N, vocab] in float32, or with keep_dtype in the
        output projection's own dtype (bf16: what the native sampler reads, 16 MB of float32
        copies fewer a 16-row step) unless a final softcap needs float32."""
        if self.lm_head is None:
            logits = bucketed_linear(hidden, self.embed_tokens.weight, None)
        else:
            logits = self.lm_head(hidden)
        cap = self.arch.final_logit_softcap
        if cap is not None:
            return torch.tanh(logits.float() / cap) * cap
        return logits if keep_dtype else logits.float()

    @torch.inference_mode()
    def warm_up(self, max_num_tokens: int, max_logit_rows: int) -> int:
        """Builds every matmul shape a step can run (`layers.warm_up_matmuls`): the decoder
        layers' projections at up to max_num_tokens rows (plain, packed, and int8's widened
        prefill path: `layers.WarmsUp`), the output projection at up to max_logit_rows. Returns
        the number of matmuls run."""
        body = [(m.weight, m.bias) for m in self.layers.modules() if isinstance(m, Linear)]
        # oneDNN keys primitives on shapes, not data: one layer of each shape will do.
        packed_body = {m.shape_key(): m for m in self.layers.modules() if isinstance(m, WarmsUp)}
        num_packed = sum(m.warm_up(max_num_tokens) for m in packed_body.values())
        head: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if self.lm_head is None:
            head.append((self.embed_tokens.weight, None))
        elif isinstance(self.lm_head, Linear):
            head.append((self.lm_head.weight, self.lm_head.bias))
        elif isinstance(self.lm_head, PackedLinear):
            num_packed += self.lm_head.warm_up(max_logit_rows)
        return (
            warm_up_matmuls(body, max_num_tokens)
            + warm_up_matmuls(head, max_logit_rows)
            + num_packed
        )

    def pack_output_projection(self, max_rows: int) -> bool:
        """Reorders the output projection's weight for oneDNN once (`PackedLinear`); whether
        it did. A tied model keeps its embedding matrix for the lookups, so the packed copy
        costs its size once more (335 MB for Gemma 3 270M in bf16) for a faster step."""
        if self.lm_head is None:
            weight, bias = self.embed_tokens.weight, None
        elif isinstance(self.lm_head, Linear):
            weight, bias = self.lm_head.weight, self.lm_head.bias
        else:  # quantized, or packed already
            return False
        packed = pack_weight(weight, bias, max_rows)
        if packed is None:
            return False
        self.lm_head = packed
        return True

    def pack_decoder_projections(self, max_rows: int) -> int:
        """Replaces each decoder projection (`Linear`, `MergedLinear`) with a `PackedLinear`
        laid out for max_rows-row inputs; returns how many. The plain weight is dropped with
        its module, so the model's size does not change. Quantized layers stay as they are, and
        so do the layers that run decode steps natively (`native_layer`), which read the plain
        weights."""
        num_packed = 0
        natively_run = [layer for layer in self.layers if getattr(layer, "native_decode", None)]
        skipped = {id(m) for layer in natively_run for m in layer.modules()}
        for parent in list(self.layers.modules()):
            if id(parent) in skipped:
                continue
            for name, child in list(parent.named_children()):
                if not isinstance(child, Linear):
                    continue
                packed = pack_weight(child.weight, child.bias, max_rows)
                if packed is not None:
                    setattr(parent, name, packed)
                    num_packed += 1
        return num_packed

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Assign transformers-named tensors (already in the model dtype), then build buffers.

        Raises ValueError naming missing or unexpected tensors. A tied model uses the embedding
        matrix as its output projection, so a stray `lm_head.weight` is dropped.
        """
        ignored = frozenset({"lm_head.weight"}) if self.lm_head is None else frozenset()
        load_checkpoint(self, weights, self.checkpoint_names, self.arch.num_layers, ignored)
        device = self.embed_tokens.weight.device
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.materialize(device)
