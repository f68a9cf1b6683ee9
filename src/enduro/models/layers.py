"""Layers shared by every architecture: RMSNorm, fused linear projections, the gated MLP."""

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from enduro.models import fused


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalised in float32 (`fused.rms_norm` says how each model scales)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.ops.rms_norm(x, self.weight, self.eps, self.unit_offset)


# Row counts up to this are used as they are (decode batches); above, rounded up.
EXACT_ROWS = 16


def row_bucket(rows: int) -> int:
    """The row count a half-precision CPU matmul runs at: exact up to EXACT_ROWS, then up to a
    multiple of 16 (to 128) or 64, so a step of any size is one of about 30 shapes."""
    if rows <= EXACT_ROWS:
        return rows
    step = 16 if rows <= 128 else 64
    return -(-rows // step) * step


def builds_primitives(t: torch.Tensor) -> bool:
    """Whether a matmul on this 2-D tensor runs in oneDNN with a primitive per shape: half
    precision on CPU (fp32 goes to MKL, which keeps none)."""
    return t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" and t.dim() == 2


def bucketed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear, with x's rows padded up to a bucket for bf16/fp16 on CPU.

    oneDNN (which runs these matmuls on CPU) compiles and caches a primitive per input shape,
    about 1 MB each for these weights, 1024 of them at most. With continuous batching the
    number of tokens changes from step to step, so without buckets an engine's memory grew by
    ~16 MB per request, to gigabytes (benchmarks/README.md, "Memory"). Padded rows are zeros
    and their outputs are dropped; a row's result does not depend on the others.
    """
    if not builds_primitives(x):
        return F.linear(x, weight, bias)
    return on_row_bucket(x, lambda padded: F.linear(padded, weight, bias))


def on_row_bucket(x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """matmul(x) run with x's rows padded with zeros up to row_bucket(rows); x's rows back."""
    rows = x.shape[0]
    bucket = row_bucket(rows)
    if bucket == rows:
        return matmul(x)
    return matmul(F.pad(x, (0, 0, 0, bucket - rows)))[:rows]


def row_buckets(max_rows: int) -> list[int]:
    """Every row count `bucketed_linear` runs a matmul at, for inputs of 1 to max_rows rows."""
    return sorted({row_bucket(rows) for rows in range(1, max_rows + 1)})


def warm_up_matmuls(
    weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], max_rows: int
) -> int:
    """Runs each distinct weight shape at every row bucket up to max_rows, on zeros; returns
    the number of matmuls run.

    oneDNN's primitive for a shape is built and cached the first time it is seen (≈1 MB each,
    `bucketed_linear`), so without this an engine's memory creeps up for its first hours as
    rarer step sizes show up, a bounded growth the guard cannot tell from a slow leak. Paying
    it at start-up keeps the primitives' share of the footprint flat from the first request
    (benchmarks/README.md, "Memory"). Weights that build none are skipped.
    """
    seen: set[tuple[tuple[int, ...], torch.dtype, bool]] = set()
    num_run = 0
    for weight, bias in weights:
        key = (tuple(weight.shape), weight.dtype, bias is not None)
        if key in seen or not builds_primitives(weight):
            continue
        seen.add(key)
        for rows in row_buckets(max_rows):
            x = weight.new_zeros(rows, weight.shape[1])
            bucketed_linear(x, weight, bias)
            num_run += 1
    return num_run


@runtime_checkable
class WarmsUp(Protocol):
    """A projection that builds oneDNN primitives of its own (`PackedLinear`, and int8's
    widened prefill path): `warm_up` runs its row buckets once; layers with equal `shape_key`
    share primitives, so one of them will do."""

    def shape_key(self) -> Hashable: ...

    def warm_up(self, max_rows: int) -> int: ...


class PackedLinear(nn.Module):
    """A half-precision CPU projection whose weight oneDNN reordered once, at load.

    F.linear hands oneDNN a plain [out, in] weight, which it reorders for its kernel at every
    call: Gemma 3's 262,144 × 640 output projection costs 23 ms at one row and 24–33 ms at 16
    that way, 14–18 ms reordered once (the same result, bit for bit, at decode sizes; a
    prefill chunk of hundreds of rows may sum in another order). The decoder layers'
    projections gain as much: their 72 matmuls in a step of the default model take 19.3 → 10.8
    ms at one row and 20.2 → 13.5 ms at 16 (benchmarks/README.md). `max_rows` is the row count
    oneDNN picks the layout for (a decode batch); larger inputs run on the same layout. Rows
    are bucketed like `bucketed_linear` (oneDNN caches a primitive per shape here too).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> None:
        super().__init__()
        # An opaque oneDNN tensor, so a plain attribute: no state_dict entry, no .to().
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, max_rows)
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return on_row_bucket(x, self._matmul)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [], ""
        )

    def shape_key(self) -> tuple[int, int, torch.dtype, bool]:
        """What oneDNN keys this layer's primitives on: layers alike share them."""
        return self.in_features, self.out_features, self.dtype, self.bias is not None

    def warm_up(self, max_rows: int) -> int:
        """Runs every row bucket up to max_rows once (see `warm_up_matmuls`)."""
        buckets = row_buckets(max_rows)
        for rows in buckets:
            self(torch.zeros(rows, self.in_features, dtype=self.dtype))
        return len(buckets)


def pack_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int
) -> PackedLinear | None:
    """A PackedLinear for `weight`, or None where oneDNN does not run it (fp32, not CPU, or a
    torch built without oneDNN)."""
    if not builds_primitives(weight) or not torch.backends.mkldnn.is_available():
        return None
    try:
        return PackedLinear(weight, bias, max_rows)
    except RuntimeError:  # a CPU oneDNN cannot serve in this dtype
        return None


class Linear(nn.Linear):
    """nn.Linear through `bucketed_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bucketed_linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several checkpoint projections stacked on the output dim (q|k|v, gate|up).

    `shard_sizes[i]` is the number of output rows of checkpoint shard i; the weight loader
    copies each shard into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up computed by one fused projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, (intermediate_size,) * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        if act not in fused.ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.ops.act_and_mul(self.gate_up_proj(x), self.act))
