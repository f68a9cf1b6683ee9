"""Rotary position embedding: cos and sin per position (`fused.apply_rotary` rotates q and k)."""

import math

import torch
from torch import nn

from enduro.models.rope_config import (
    FrequencyDivisors,
    LinearScaling,
    Llama3Scaling,
    RopeConfig,
)


class RotaryEmbedding(nn.Module):
    """cos and sin of position * inv_freq, in float32, for one `RopeConfig`."""

    inv_freq: torch.Tensor

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        # Built on whatever device is current (meta at model build); `materialize` redoes it.
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        # Each case is computed in transformers' order of float32 operations, so the
        # frequencies equal its bit for bit.
        dim, theta, scaling = self.rope.rotary_dim, self.rope.theta, self.rope.scaling
        powers = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        match scaling:
            case None:
                return 1.0 / powers
            case LinearScaling(factor=factor):
                return 1.0 / powers / factor
            case Llama3Scaling():
                return llama3_inv_freq(1.0 / powers, scaling)
            case FrequencyDivisors(divisors=divisors):
                return 1.0 / (torch.tensor(divisors, dtype=torch.float32, device=device) * powers)

    def materialize(self, device: torch.device) -> None:
        """Recompute the buffer on a real device, in float32 whatever the model dtype."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] → cos, sin: [T, rotary_dim / 2]
        freqs = positions[:, None].float() * self.inv_freq
        return freqs.cos(), freqs.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Llama3Scaling) -> torch.Tensor:
    """Llama 3 scaling of base frequencies: keep the fast, divide the slow, blend in between."""
    original = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    # Kept where the wavelength is under original / high, divided above original / low.
    kept_or_divided = torch.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
    # Between the two, weight s on the kept frequency; s runs from 0 at original / low to 1 at
    # original / high, so the blend is continuous with both neighbours.
    s = (original / wavelength - low) / (high - low)
    blended = (1 - s) * inv_freq / scaling.factor + s * inv_freq
    in_between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_between, blended, kept_or_divided)
