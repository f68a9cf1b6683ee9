"""The elementwise stretches of a decoder layer, as functions that run eagerly or compiled.

Between its matmuls and its attention a decoder layer runs ≈90 small tensor ops (norms in
float32, the rotary embedding, the gated activation, residual adds). With a handful of
tokens a step each op costs more in dispatch and Python than in arithmetic: on the default
model they are ≈25 ms of a 70 ms one-stream step (benchmarks/README.md). `use_compiled(True)`
(`--compile`) swaps in `torch.compile`d versions, so each stretch is one generated kernel
instead of a dozen ops. The matmuls (bucketed for oneDNN, or quantized) and the paged
attention stay eager: they are already single kernels, and their shapes would multiply the
graphs to compile.

One switch for the process, not one per model: an engine process runs one model, and the
compiled functions are shared by every layer (the weights are arguments, not captured), so
each is compiled once for all 18 layers. The eager versions are the reference: compiled
ones compute in float32 internally and round once, so they agree to rounding, not bit for
bit.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from enduro import native

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """x / rms(x) * w, normalised in float32.

    `unit_offset` is Gemma's convention: the checkpoint stores w - 1, and the scaling by
    (1 + w) happens in float32 before the cast back. Otherwise (Llama) the normalised value is
    cast back first and then scaled by w in the model dtype.
    """
    # F.rms_norm is one kernel for what x * rsqrt(mean(x²) + eps) spells in five ops, with
    # the same float32 result (≈25 µs less per call at 16 rows, 108 calls a step).
    x32 = x.float()
    if unit_offset:
        return F.rms_norm(x32, x.shape[-1:], 1.0 + weight.float(), eps).to(x.dtype)
    return weight * F.rms_norm(x32, x.shape[-1:], None, eps).to(x.dtype)


Norm = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


def add_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    unit_offset: bool,
    norm: Norm = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = residual + x: a pre-norm layer's residual add and the next norm."""
    h = residual + x
    return h, norm(h, weight, eps, unit_offset)


def add_normed(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool
) -> torch.Tensor:
    """residual + norm(x): a sandwich-norm layer's normalised sublayer output added back."""
    return residual + rms_norm(x, weight, eps, unit_offset)


def add_normed_then_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    next_weight: torch.Tensor,
    eps: float,
    unit_offset: bool,
    add_normed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor] = (
        add_normed
    ),
    norm: Norm = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm'(h)) with h = residual + norm(x): between a sandwich layer's attention and MLP."""
    h = add_normed(residual, x, weight, eps, unit_offset)
    return h, norm(h, next_weight, eps, unit_offset)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate the first rotary_dim dims of every head of x; the rest pass through.

    x: [T, H, D]; cos, sin: [T, rotary_dim / 2]. Pair i is (i, i + rotary_dim / 2) in neox
    style and (2i, 2i + 1) when interleaved (GLM-4); both turn by position * inv_freq[i].
    """
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos = cos[:, None, :].to(x.dtype)  # [T, 1, rotary_dim / 2]
    sin = sin[:, None, :].to(x.dtype)
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if interleaved:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((out1, out2), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1)


def qk_norm_rotary(
    qkv: torch.Tensor,
    sizes: tuple[int, int, int],
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    unit_offset: bool,
    interleaved: bool,
    norm: Norm = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused q|k|v projection's output → q [T, Hq, D], k, v [T, Hkv, D]: split, per-head
    norms of q and k (`norm`) when the model has them, then the rotary embedding of q and k."""
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split(sizes, dim=-1)
    q = q.view(num_tokens, sizes[0] // head_dim, head_dim)
    k = k.view(num_tokens, sizes[1] // head_dim, head_dim)
    v = v.view(num_tokens, sizes[2] // head_dim, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = norm(q, q_norm, eps, unit_offset), norm(k, k_norm, eps, unit_offset)
    q = apply_rotary(q, cos, sin, interleaved)
    k = apply_rotary(k, cos, sin, interleaved)
    return q, k, v


def act_and_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, from the fused gate|up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


# The activations the native gated activation computes (here and in the native decode layer,
# `native_layer.py`), by their code in native/decode_layer.c.
NATIVE_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


class NativeOps:
    """The norms above in enduro's C kernel (`native/rms_norm.c`) for bf16 on CPU, the eager
    functions otherwise: the same rounding points, in one call instead of ≈6 ops. Bit-identical
    to the eager versions in the tests, though the sum of squares runs in another order, so an
    input may round one bf16 step apart. And the gated activation (`act_and_mul`), which the
    kernel computes by another formula than torch's, so an output may round one bf16 step
    apart: 0.25 ms against torch's 0.77 for a 512-token prompt's [512, 2 × 2048] on the
    default model."""

    def __init__(self, library: native.Library) -> None:
        self.library = library

    def _runs(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and x.device.type == "cpu"

    def _norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        unit_offset: bool,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dim = x.shape[-1]
        if x.dim() == 3 and x.stride(1) == dim and x.stride(2) == 1:
            # [T, H, D] heads read in place (q or k split off the fused projection).
            inner, outer_stride = x.shape[1], x.stride(0)
        else:
            x = x.contiguous()
            inner, outer_stride = 1, dim
        out = torch.empty(x.shape, dtype=x.dtype)
        if residual is not None:
            residual = residual.contiguous()
        self.library.rms_norm(
            x.data_ptr(),
            x.numel() // dim,
            dim,
            inner,
            outer_stride,
            weight.contiguous().data_ptr(),
            eps,
            int(unit_offset),
            residual.data_ptr() if residual is not None else None,
            out.data_ptr(),
        )
        return out

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool
    ) -> torch.Tensor:
        if not self._runs(x):
            return rms_norm(x, weight, eps, unit_offset)
        return self._norm(x, weight, eps, unit_offset)

    def add_normed(
        self,
        residual: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        unit_offset: bool,
    ) -> torch.Tensor:
        if not self._runs(x) or residual.dtype != x.dtype:
            return add_normed(residual, x, weight, eps, unit_offset)
        return self._norm(x, weight, eps, unit_offset, residual)

    def act_and_mul(self, gate_up: torch.Tensor, act: str) -> torch.Tensor:
        code = NATIVE_ACTIVATIONS.get(act)
        if code is None or not self._runs(gate_up):
            return act_and_mul(gate_up, act)
        gate_up = gate_up.contiguous()
        inter = gate_up.shape[-1] // 2
        out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
        self.library.act_and_mul(
            gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter, code, out.data_ptr()
        )
        return out


class FusedOps:
    """The functions above, as the layers call them: `ops.rms_norm(...)` and so on."""

    def __init__(self, compiled: bool, native_ops: NativeOps | None = None) -> None:
        self.compiled = compiled
        wrap: Callable[[Any], Any] = _compile if compiled else (lambda fn: fn)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.add_normed = wrap(add_normed)
        self.add_normed_then_norm = wrap(add_normed_then_norm)
        self.qk_norm_rotary = wrap(qk_norm_rotary)
        self.act_and_mul = wrap(act_and_mul)
        if native_ops is not None:
            # The eager stretches, with the native norm (and norm-then-add) inside.
            self.rms_norm = native_ops.rms_norm
            self.add_rms_norm = partial(add_rms_norm, norm=native_ops.rms_norm)
            self.add_normed = native_ops.add_normed
            self.add_normed_then_norm = partial(
                add_normed_then_norm, add_normed=native_ops.add_normed, norm=native_ops.rms_norm
            )
            self.qk_norm_rotary = partial(qk_norm_rotary, norm=native_ops.rms_norm)
            self.act_and_mul = native_ops.act_and_mul


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Automatic dynamic shapes: the first call compiles for its token count, the first call
    # with another count recompiles with the count symbolic, and that graph serves every count
    # but 1, which dynamo specialises (the one-stream decode step: worth its own kernel). The
    # ints and flags stay constants. Not fullgraph: past dynamo's recompile limit a fullgraph
    # function raises, where this one falls back to eager; tests/models/test_fused.py checks
    # that the functions compile whole.
    return torch.compile(fn)


EAGER = FusedOps(compiled=False)
ops = EAGER


def use_compiled(enabled: bool, library: native.Library | None = None) -> None:
    """Make the layers call compiled (True) or eager (False) versions from now on. The
    compiled set is built once per process, so switching back and forth compiles nothing new.
    Eager, with a native `library`, the norms and the gated activation run in its kernels
    (`NativeOps`)."""
    global ops, _compiled_ops
    if not enabled:
        ops = FusedOps(compiled=False, native_ops=NativeOps(library)) if library else EAGER
        return
    if _compiled_ops is None:
        _compiled_ops = FusedOps(compiled=True)
    ops = _compiled_ops


_compiled_ops: FusedOps | None = None
