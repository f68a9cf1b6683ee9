"""GGUF tensor names → transformers checkpoint names, as data per architecture.

llama.cpp names tensors `token_embd.weight`, `output.weight`, `output_norm.weight` and
`blk.{N}.{leaf}.{weight|bias}`; transformers names the same tensors `model.embed_tokens.weight`,
`lm_head.weight`, `model.norm.weight` and `model.layers.{N}.{module}.{weight|bias}`. The leaf map
differs per architecture only in its norms (and GLM-4's fused MLP input), so each entry is built
from shared pieces. The value transforms llama.cpp's converter applies are flags here and undone
in `gguf.py`.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureNames:
    """How one architecture's GGUF tensors map onto its transformers checkpoint."""

    model_type: str  # transformers' config model_type
    hf_architecture: str  # transformers' model class, for config["architectures"]
    block_names: Mapping[str, str]  # leaf in blk.N → module in model.layers.N
    # llama.cpp stores every `*norm.weight` as 1 + w, because Gemma's RMSNorm scales by (1 + w)
    # and llama.cpp's scales by the stored weight.
    offset_norms: bool = False
    # llama.cpp reorders attn_q / attn_k rows of each head from transformers' half-split rope
    # layout (x[:d/2], x[d/2:]) to the interleaved one its rope kernel expects (x[0::2], x[1::2]).
    rope_permuted: bool = False
    # Tensors that are configuration, not weights: gguf_config reads them, the weight plan skips
    # them. In any other architecture such a tensor is refused like any unknown name.
    config_tensors: frozenset[str] = frozenset()


GLOBAL_NAMES: Mapping[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp's form of Llama 3 rope scaling: one divisor per rope frequency.
ROPE_FREQS = "rope_freqs.weight"

_ATTENTION = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GATED_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Llama-style blocks: one norm before attention, one before the MLP.
_PRE_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

ARCHITECTURES: Mapping[str, ArchitectureNames] = {
    "llama": ArchitectureNames(
        "llama",
        "LlamaForCausalLM",
        {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
        rope_permuted=True,
        config_tensors=frozenset({ROPE_FREQS}),
    ),
    "qwen2": ArchitectureNames(
        "qwen2", "Qwen2ForCausalLM", {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS}
    ),
    "qwen3": ArchitectureNames(
        "qwen3", "Qwen3ForCausalLM", {**_ATTENTION, **_QK_NORM, **_GATED_MLP, **_PRE_NORMS}
    ),
    # Gemma 3 norms both sides of attention and of the MLP; transformers' post_attention_layernorm
    # is the norm *after* attention here, not the pre-MLP one it is in Llama.
    "gemma3": ArchitectureNames(
        "gemma3_text",
        "Gemma3ForCausalLM",
        {
            **_ATTENTION,
            **_QK_NORM,
            **_GATED_MLP,
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        offset_norms=True,
    ),
    # GLM-4 keeps gate and up fused (gate rows first) in one matrix, which llama.cpp calls ffn_up,
    # and norms after attention and after the MLP as well as before each.
    "glm4": ArchitectureNames(
        "glm4",
        "Glm4ForCausalLM",
        {
            **_ATTENTION,
            "ffn_up": "mlp.gate_up_proj",
            "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_self_attn_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_mlp_layernorm",
        },
    ),
}

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(names: ArchitectureNames, gguf_name: str) -> str | None:
    """The transformers checkpoint name of a GGUF tensor, or None if it has no counterpart."""
    if match := _BLOCK.fullmatch(gguf_name):
        layer, leaf, kind = match.groups()
        module = names.block_names.get(leaf)
        return None if module is None else f"model.layers.{int(layer)}.{module}.{kind}"
    if match := _GLOBAL.fullmatch(gguf_name):
        leaf, kind = match.groups()
        module = GLOBAL_NAMES.get(leaf)
        return None if module is None else f"{module}.{kind}"
    return None
