"""One rotary embedding's settings, read from transformers' rope parameters.

Scaling stretches a rope past the context it was trained on by slowing some of its frequencies.
Each kind transformers describes by a `rope_type` that enduro honours exactly is one small frozen
dataclass here; `RotaryEmbedding` applies it to the base frequencies theta^(-2i/rotary_dim).
"""

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LinearScaling:
    """rope_type "linear": every frequency divided by `factor`."""

    factor: float


@dataclass(frozen=True)
class Llama3Scaling:
    """rope_type "llama3" (Llama 3.1 and later): only the slow frequencies are slowed further.

    With L = original_max_position_embeddings, a frequency whose wavelength 2π / inv_freq is below
    L / high_freq_factor turns many times within L and is kept; one above L / low_freq_factor is
    divided by `factor`; in between, the two are blended with weight
    s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor) on the kept one.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        # Equal factors would make the blend weight divide by zero.
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 rope needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError("llama3 rope needs a positive factor and original length")


@dataclass(frozen=True)
class FrequencyDivisors:
    """Frequency i divided by divisors[i]: the form llama.cpp stores llama3 scaling in (its
    `rope_freqs` tensor), and transformers' "longrope" when its short and long factors agree."""

    divisors: tuple[float, ...]

    def __post_init__(self) -> None:
        if not all(math.isfinite(d) and d > 0 for d in self.divisors):
            raise ValueError(f"rope frequency divisors must be positive, got {self.divisors}")


RopeScaling = LinearScaling | Llama3Scaling | FrequencyDivisors


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one kind of layer (Gemma 3 has two: local and global)."""

    # Base of the inverse frequencies theta^(-2i/rotary_dim).
    theta: float
    # Leading dims of each head that rotate; the rest pass through (GLM-4 rotates half).
    rotary_dim: int
    # How the base frequencies are slowed for long context; None for rope_type "default".
    scaling: RopeScaling | None = None
    # Rotate pairs (2i, 2i + 1) (GLM-4) instead of (i, i + rotary_dim / 2) (neox style).
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be positive and even, got {self.rotary_dim}")
        if isinstance(self.scaling, FrequencyDivisors) and (
            len(self.scaling.divisors) != self.rotary_dim // 2
        ):
            raise ValueError(
                f"{len(self.scaling.divisors)} rope frequency divisors for "
                f"{self.rotary_dim // 2} frequencies"
            )


def rope_config(params: dict[str, Any], head_dim: int, interleaved: bool) -> RopeConfig:
    """The rope of one transformers `rope_parameters` dict (rope_theta filled in by the caller);
    raises ValueError for a rope type enduro cannot reproduce exactly."""
    partial = float(params.get("partial_rotary_factor") or 1.0)
    try:
        scaling = _scaling(params)
    except KeyError as missing:
        raise ValueError(f"rope parameters {params} lack {missing}") from None
    return RopeConfig(
        theta=float(params["rope_theta"]),
        rotary_dim=int(head_dim * partial),
        scaling=scaling,
        interleaved=interleaved,
    )


def _scaling(params: dict[str, Any]) -> RopeScaling | None:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return LinearScaling(float(params["factor"]))
    if rope_type == "llama3":
        return Llama3Scaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if rope_type == "longrope":
        return _fixed_longrope(params)
    raise ValueError(
        f"unsupported rope type {rope_type!r}; supported: default, linear, llama3, "
        f"longrope with equal short and long factors"
    )


def _fixed_longrope(params: dict[str, Any]) -> FrequencyDivisors:
    """Longrope switches from short_factor to long_factor past the original length and scales
    attention by attention_factor; with equal factor lists and attention_factor 1 (transformers
    also derives 1 from a factor of at most 1) it is fixed divisors, which enduro supports."""
    short, long = list(params["short_factor"]), list(params["long_factor"])
    factor, attention = params.get("factor"), params.get("attention_factor")
    if attention is None and factor is not None and factor <= 1.0:
        attention = 1.0
    if short != long or attention != 1.0:
        raise ValueError(
            "longrope is supported only with short_factor == long_factor and attention_factor 1"
        )
    return FrequencyDivisors(tuple(float(divisor) for divisor in short))
