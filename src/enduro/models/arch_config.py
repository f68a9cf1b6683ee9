"""What the model code needs to know about an architecture, read from an HF `config.json`.

Architecture differences are flags here (`qk_norm`, `qkv_bias`, `norm_unit_offset`, ...), so one
set of layers serves every family. Both the transformers 5 `rope_parameters` layout and the
older flat keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `partial_rotary_factor`)
are understood.
"""

from dataclasses import dataclass
from typing import Any

from enduro.models.rope_config import RopeConfig, rope_config

# config.json `architectures` entries and `model_type` values → registry key.
ARCHITECTURE_KEYS: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "llama": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "qwen2": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "qwen3": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "gemma3_text": "gemma3",
    "Glm4ForCausalLM": "glm4",
    "glm4": "glm4",
}

# transformers' config defaults, used only for keys a config.json leaves out.
_COMMON_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "max_window_layers": 28,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "gemma3": {
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    },
    "glm4": {"attention_bias": True, "rms_norm_eps": 1.5625e-7},
}
_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ArchConfig:
    """One model architecture with its sizes; enough to build the model on the meta device."""

    architecture: str  # registry key: llama, qwen2, qwen3, gemma3, glm4
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    # Per layer: attend to the last `window` tokens (itself included), or None for all.
    sliding_windows: tuple[int | None, ...]
    # Per layer: its rotary embedding.
    ropes: tuple[RopeConfig, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    rms_norm_eps: float
    # RMSNorm scales by (1 + w) in float32 (Gemma) instead of by w.
    norm_unit_offset: bool
    hidden_act: str  # silu, gelu (exact) or gelu_pytorch_tanh
    qkv_bias: bool  # q/k/v projections have a bias (Qwen2, GLM-4)
    o_proj_bias: bool  # the attention output projection has a bias
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    tie_word_embeddings: bool  # the output projection is the embedding matrix
    attn_scale: float  # multiplies q·k
    # Multiply embeddings by sqrt(hidden_size), rounded to the model dtype (Gemma).
    scale_embeddings: bool
    # cap * tanh(logits / cap) on the output logits, when set (Gemma).
    final_logit_softcap: float | None

    def __post_init__(self) -> None:
        if len(self.sliding_windows) != self.num_layers or len(self.ropes) != self.num_layers:
            raise ValueError("sliding_windows and ropes need one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads not a multiple of {self.num_kv_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {_ACTIVATIONS}")
        if any(rope.rotary_dim > self.head_dim for rope in self.ropes):
            raise ValueError("rotary_dim exceeds head_dim")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ArchConfig":
        """Parse an HF config.json dict; raises ValueError on anything it cannot honour exactly."""
        architecture = _architecture_key(d)
        d = {**_COMMON_DEFAULTS, **_DEFAULTS[architecture], **d}
        is_gemma = architecture == "gemma3"
        if is_gemma and d.get("use_bidirectional_attention"):
            raise ValueError("bidirectional Gemma 3 attention is not supported")
        if is_gemma and d.get("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 reads this key but never applies it (Gemma 2 does), so the
            # reference itself is ambiguous; released Gemma 3 checkpoints set it to null.
            raise ValueError("Gemma 3 attn_logit_softcapping is not supported")
        num_heads = int(_require(d, "num_attention_heads"))
        head_dim = int(d.get("head_dim") or int(_require(d, "hidden_size")) // num_heads)
        layer_types = _layer_types(architecture, d)
        eos = d.get("eos_token_id")
        scale_base = d["query_pre_attn_scalar"] if is_gemma else head_dim
        return cls(
            architecture=architecture,
            vocab_size=int(_require(d, "vocab_size")),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(_require(d, "intermediate_size")),
            num_layers=len(layer_types),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            max_position_embeddings=int(_require(d, "max_position_embeddings")),
            sliding_windows=_sliding_windows(architecture, d, layer_types),
            ropes=_ropes(architecture, d, head_dim, layer_types),
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            bos_token_id=d.get("bos_token_id"),
            rms_norm_eps=float(d["rms_norm_eps"]),
            norm_unit_offset=is_gemma,
            hidden_act=d["hidden_activation"] if is_gemma else d["hidden_act"],
            qkv_bias=architecture == "qwen2" or bool(d["attention_bias"]),
            o_proj_bias=architecture not in ("qwen2", "glm4") and bool(d["attention_bias"]),
            mlp_bias=bool(d["mlp_bias"]),
            qk_norm=architecture in ("qwen3", "gemma3"),
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            attn_scale=scale_base**-0.5,
            scale_embeddings=is_gemma,
            final_logit_softcap=d.get("final_logit_softcapping") if is_gemma else None,
        )


def _require(d: dict[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}")
    return d[key]


def _architecture_key(d: dict[str, Any]) -> str:
    names = [*(d.get("architectures") or []), d.get("model_type")]
    for name in names:
        if name in ARCHITECTURE_KEYS:
            return ARCHITECTURE_KEYS[name]
    raise ValueError(f"unsupported architecture {names}; supported: {sorted(ARCHITECTURE_KEYS)}")


def _layer_types(architecture: str, d: dict[str, Any]) -> list[str]:
    """ "sliding_attention" or "full_attention" per layer, defaulted as transformers does."""
    num_layers = int(_require(d, "num_hidden_layers"))
    layer_types = d.get("layer_types")
    if layer_types is None and architecture == "gemma3":
        # Older Gemma 3 configs: every `pattern`-th layer is global, the others local.
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    if layer_types is None and architecture in ("qwen2", "qwen3"):
        first_sliding = d["max_window_layers"] if d["use_sliding_window"] else num_layers
        layer_types = [
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(num_layers)
        ]
    if layer_types is None:
        layer_types = ["full_attention"] * num_layers
    if len(layer_types) != num_layers or not set(layer_types) <= set(_LAYER_TYPES):
        raise ValueError(f"bad layer_types {layer_types} for {num_layers} layers")
    return list(layer_types)


def _sliding_windows(
    architecture: str, d: dict[str, Any], layer_types: list[str]
) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if architecture in ("llama", "glm4") or (
        architecture != "gemma3" and not d["use_sliding_window"]
    ):
        window = None
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _ropes(
    architecture: str, d: dict[str, Any], head_dim: int, layer_types: list[str]
) -> tuple[RopeConfig, ...]:
    if architecture != "gemma3":
        params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        params.setdefault("rope_theta", d.get("rope_theta") or 10000.0)
        default_partial = 0.5 if architecture == "glm4" else 1.0
        params.setdefault(
            "partial_rotary_factor", d.get("partial_rotary_factor") or default_partial
        )
        # As transformers: a top-level original length wins, else max_position_embeddings.
        params["original_max_position_embeddings"] = (
            d.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or d.get("max_position_embeddings")
        )
        rope = rope_config(params, head_dim, interleaved=architecture == "glm4")
        return (rope,) * len(layer_types)
    # Gemma 3: local layers and global layers have their own base; older configs name them
    # `rope_local_base_freq` and `rope_theta`, and their `rope_scaling` applies to global only.
    nested = d.get("rope_parameters") or {}
    full = dict(nested.get("full_attention") or {})
    full.update(d.get("rope_scaling") or {})
    full.setdefault("rope_theta", d.get("rope_theta") or 1_000_000.0)
    sliding = dict(nested.get("sliding_attention") or {})
    sliding.setdefault("rope_theta", d.get("rope_local_base_freq") or 10_000.0)
    by_type = {
        "full_attention": rope_config(full, head_dim, interleaved=False),
        "sliding_attention": rope_config(sliding, head_dim, interleaved=False),
    }
    return tuple(by_type[t] for t in layer_types)
