"""Weight-only int8 and int4 quantization of a loaded model's projections (CPU kernels).

`quantize_model` replaces every `nn.Linear` (and so `MergedLinear`) of the decoder layers and the
output projection with `Int8Linear` or `Int4Linear`; "int4-head" replaces the output projection
only, where the small models spend most of their weight reads (Gemma 3 270M: 168 M of its 268 M
parameters) and, measured, where int4 costs the least perplexity. Activations stay in floating
point: both kernels take bf16 activations (fp32 ones make the int8 kernel ~7x slower), so a
layer casts its input to bf16 and its output back. A tied output projection is quantized from
the embedding table into a separate `lm_head`; the embedding lookup keeps the full-precision
table.
"""

import logging

import torch
from torch import nn

from enduro import native
from enduro.config import QUANTIZATIONS
from enduro.models.base import CausalLM
from enduro.models.layers import bucketed_linear, row_buckets

# The int4 kernel takes group sizes 32..256; at batch 1 (640 → 262,144) 32 costs 7.9 ms, 64
# 7.3 ms, 128 9.0 ms; the smallest groups fit each scale to the fewest weights.
INT4_GROUP_SIZE = 32
# `_convert_weight_to_int4pack_for_cpu` packs output rows in tiles of 16.
INT4_ROW_MULTIPLE = 16
KERNEL_DTYPE = torch.bfloat16
# Weights are quantized this many rows at a time (a multiple of 16, which the int4 pack tiles by,
# as packing row blocks separately gives the same bytes), so the float32 temporaries of the
# 262,144-row output projection stay ~20 MB instead of ~2 GB.
CHUNK_ROWS = 8192
# From this many rows (prefill chunks) arithmetic, not weight reads, bounds an int8 layer, and
# oneDNN's bf16 GEMM on the weight widened to bf16 for the call beats both int8 kernels: the
# 72 decoder projections at 512 rows take ≈130 ms that way, 181 ms in enduro's kernel, 325 ms
# in torch's (benchmarks/linear_kernels.py); at 128 rows the two ways are even.
WIDENED_MIN_ROWS = 256

logger = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with symmetric int8 q and one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        chunks = [_int8_rows(rows) for rows in weight.split(CHUNK_ROWS)]
        q = torch.cat([chunk[0] for chunk in chunks])
        scales = torch.cat([chunk[1] for chunk in chunks])
        self.weight: torch.Tensor
        self.scales: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("weight", q)  # [N, K]
        self.register_buffer("scales", scales)  # [N]
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        on_cpu = rows.device.type == "cpu"
        # enduro's kernel (`native/linear.c`) where it is built: 1.2x torch's at one row, 1.8x
        # at 128 (benchmarks/linear_kernels.py).
        library = native.load() if on_cpu else None
        if on_cpu and rows.shape[0] >= WIDENED_MIN_ROWS:
            # int8 is exact in bf16; the products are summed in float32 and rounded once, as
            # the kernels do, then scaled.
            summed = bucketed_linear(rows, self.weight.to(KERNEL_DTYPE), None)
            out = (summed.float() * self.scales.float()).to(KERNEL_DTYPE)
        elif library is None:
            out = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        else:
            rows = rows.contiguous()
            out = rows.new_empty(rows.shape[0], self.weight.shape[0])
            library.linear_int8(
                rows.data_ptr(),
                rows.shape[0],
                rows.shape[1],
                self.weight.data_ptr(),
                self.scales.data_ptr(),
                self.weight.shape[0],
                out.data_ptr(),
            )
        return _finish(out, self.bias, x)

    def shape_key(self) -> tuple[str, int, int]:
        """What oneDNN keys the widened matmuls' primitives on: layers alike share them."""
        return "int8-widened", self.weight.shape[1], self.weight.shape[0]

    def warm_up(self, max_rows: int) -> int:
        """Runs each row bucket of max_rows or fewer that takes the widened path once, so its
        oneDNN primitive is built at start-up (see `layers.warm_up_matmuls`)."""
        buckets = [rows for rows in row_buckets(max_rows) if rows >= WIDENED_MIN_ROWS]
        for rows in buckets:
            self(torch.zeros(rows, self.weight.shape[1], dtype=KERNEL_DTYPE))
        return len(buckets)

    def dequantized_weight(self) -> torch.Tensor:
        """The [N, K] float32 matrix this layer multiplies by."""
        return self.weight.float() * self.scales.float()[:, None]


# Inputs per activation scale in w8a8 layers: on the reference text one scale per row cost
# +5.1 % perplexity over int8, one per 128 inputs +0.6 %, per 64 +0.5 %, per 32 +0.5 %
# (benchmarks/README.md, "Int8 activations"); the kernel's work per group is the same.
W8A8_GROUPS = (128, 64, 32)
W8A8_LANES = 16  # outputs per packed block (`native/linear_w8a8.c`)
W8A8_OFFSET = 128  # weights are stored as q + 128: vpdpbusd takes them unsigned


def w8a8_library() -> native.Library | None:
    """The native kernels if they have the w8a8 vector path (AVX512-VNNI) here, else None."""
    library = native.load()
    return library if library is not None and library.w8a8_vectorized() else None


def w8a8_group(in_features: int) -> int | None:
    """The activations' group size for a layer of `in_features` inputs, or None when none
    of W8A8_GROUPS divides it."""
    return next((g for g in W8A8_GROUPS if in_features % g == 0), None)


class W8A8Linear(nn.Module):
    """y = x @ (q * scale).T + bias on int8 weights (Int8Linear's quantization, one scale per
    output channel) and int8 activations: each row of x is quantized per group of
    `w8a8_group` inputs when it arrives, and the int8 products are summed with AVX512-VNNI
    (`native/linear_w8a8.c`, which also says how the weights are packed)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, library: native.Library
    ) -> None:
        super().__init__()
        group = w8a8_group(weight.shape[1])
        if group is None:
            raise ValueError(f"no w8a8 group size divides {weight.shape[1]} inputs")
        self.library = library
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        blocks = -(-self.out_features // W8A8_LANES)
        packed = torch.empty(blocks, self.in_features // 4, W8A8_LANES, 4, dtype=torch.uint8)
        scales = torch.zeros(blocks * W8A8_LANES)  # float32; padded rows' outputs are dropped
        for start in range(0, self.out_features, CHUNK_ROWS):  # a multiple of 16
            q, chunk_scales = _int8_rows(weight[start : start + CHUNK_ROWS])
            rows = q.shape[0]
            offset = torch.full(
                (-(-rows // W8A8_LANES) * W8A8_LANES, self.in_features),
                W8A8_OFFSET,
                dtype=torch.uint8,
            )  # padded rows hold zero weights
            offset[:rows] = (q.to(torch.int16) + W8A8_OFFSET).to(torch.uint8)
            first = start // W8A8_LANES
            packed[first : first + offset.shape[0] // W8A8_LANES] = _pack_w8a8(offset)
            scales[start : start + rows] = chunk_scales.float()
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("packed", packed)  # [N / 16, K / 4, 16, 4]
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
        out = rows.new_empty(rows.shape[0], self.out_features)
        status = self.library.linear_w8a8(
            rows.data_ptr(),
            rows.shape[0],
            self.in_features,
            self.packed.data_ptr(),
            self.scales.data_ptr(),
            self.group,
            self.out_features,
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("w8a8 linear: scratch memory could not be allocated")
        return _finish(out, self.bias, x)

    def int8_weight(self) -> torch.Tensor:
        """The [N, K] int8 weights, unpacked."""
        blocks, _, lanes, _ = self.packed.shape
        plain = self.packed.permute(0, 2, 1, 3).reshape(blocks * lanes, self.in_features)
        return (plain[: self.out_features].to(torch.int16) - W8A8_OFFSET).to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        """The [N, K] float32 matrix the int8 activations are multiplied by."""
        return self.int8_weight().float() * self.scales[: self.out_features, None]


def _pack_w8a8(offset: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 (N a multiple of 16, K of 4) → [N / 16, K / 4, 16, 4]: one 64-byte vector
    holds 4 consecutive inputs of 16 consecutive outputs."""
    n, k = offset.shape
    return offset.view(n // W8A8_LANES, W8A8_LANES, k // 4, 4).permute(0, 2, 1, 3).contiguous()


class Int4Linear(nn.Module):
    """y = x @ w.T + bias, w = (q - 8) * scale + zero per group of `INT4_GROUP_SIZE` inputs.

    Asymmetric: each group's [min, max] maps onto q in 0..15. Needs N % 16 == 0 and
    K % INT4_GROUP_SIZE == 0 (`int4_supports`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        chunks = [_int4_rows(rows) for rows in weight.split(CHUNK_ROWS)]
        self.in_features = weight.shape[1]
        self.packed: torch.Tensor
        self.scales_and_zeros: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("packed", torch.cat([chunk[0] for chunk in chunks]))
        self.register_buffer("scales_and_zeros", torch.cat([chunk[1] for chunk in chunks], dim=1))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        out = torch._weight_int4pack_mm_for_cpu(
            rows, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros
        )
        return _finish(out, self.bias, x)

    def dequantized_weight(self) -> torch.Tensor:
        """The [N, K] float32 matrix this layer multiplies by (unpacked via the kernel itself)."""
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE)
        return (
            torch._weight_int4pack_mm_for_cpu(
                eye, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros
            )
            .float()
            .T
        )


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, K] → (int8 q [n, K], bf16 scales [n])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    # The kernel multiplies by the bf16 scales, so q is rounded against those.
    scales = scales.to(KERNEL_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def _int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, K] → (packed q [n, K / 2] uint8, scales_and_zeros [K / g, n, 2] bf16)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    # Scale and zero are rounded to the kernel's bf16 first so q is chosen against them.
    scales = ((high - low) / 15).clamp(min=1e-6).to(KERNEL_DTYPE).float()
    zeros = (low + 8 * scales).to(KERNEL_DTYPE).float()
    q = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # The kernel's layout: [K / g, N, 2], scale then zero.
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).squeeze(2).transpose(0, 1)
    return packed, scales_and_zeros.to(KERNEL_DTYPE).contiguous()


def _finish(out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Kernel output [rows, N] → x's leading shape and dtype, plus the bias."""
    out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def int4_supports(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % INT4_ROW_MULTIPLE == 0 and k % INT4_GROUP_SIZE == 0


def quantize_weight(
    method: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> nn.Module | None:
    """The quantized layer for one [N, K] weight, or None when the kernel can't take its shape."""
    if method == "int8":
        return Int8Linear(weight, bias)
    if method == "w8a8":
        library = w8a8_library()
        if library is None or w8a8_group(weight.shape[1]) is None:
            return Int8Linear(weight, bias)  # weights alike, activations left in bf16
        return W8A8Linear(weight, bias, library)
    if method == "int4":
        return Int4Linear(weight, bias) if int4_supports(weight) else None
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")


def quantize_model(model: CausalLM, method: str) -> list[str]:
    """Quantize the decoder projections and the output projection in place.

    Each replaced `nn.Linear` is dropped as soon as its quantized layer exists, so a matrix is
    never held twice. Returns the names of the layers left in full precision (shapes the kernel
    can't take). "none" changes nothing.
    """
    if method == "none":
        return []
    if method == "int4-head":
        return _quantize_head(model, "int4")
    if method == "w8a8" and w8a8_library() is None:
        logger.warning(
            "w8a8 needs enduro's native kernels on a CPU with AVX512-VNNI: "
            "running int8 (weight-only) instead"
        )
        method = "int8"
    skipped = []
    for layer_name, layer in model.layers.named_children():
        targets = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in targets:
            quantized = quantize_weight(method, linear.weight, linear.bias)
            if quantized is None:
                skipped.append(f"layers.{layer_name}.{name}")
                continue
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name), attr, quantized)
    return skipped + _quantize_head(model, method)


def _quantize_head(model: CausalLM, method: str) -> list[str]:
    """Quantize the output projection; ["lm_head"] when the kernel can't take its shape."""
    head = model.lm_head
    output = head.weight if isinstance(head, nn.Linear) else model.embed_tokens.weight
    lm_head = quantize_weight(method, output, None)
    if lm_head is None:
        return ["lm_head"]
    model.lm_head = lm_head
    return []
