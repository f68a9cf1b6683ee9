"""GGUF weights as an iterator of (transformers name, tensor).

Each tensor is dequantized on its own (gguf.quants, numpy), renamed by the architecture's name
map, has llama.cpp's converter transforms undone, and is cast to the requested dtype, so the
model is never in memory twice. Everything that can be checked without reading tensor data is
checked when the plan is made, before any work starts. Tensors that are configuration, not
weights (Llama's rope_freqs), are left out of the plan; gguf_config reads them.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_config import architecture_of
from enduro.loading.gguf_names import ARCHITECTURES, ArchitectureNames, hf_name
from enduro.loading.gguf_reader import GGUFFile, GGUFTensorInfo

Q = GGMLQuantizationType
# The tensor types gguf.quants can dequantize that this loader accepts (a test dequantizes one
# block of each, so the list cannot name a type the library does not handle).
DEQUANTIZABLE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {
        Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
    }
)  # fmt: skip


@dataclass(frozen=True)
class GGUFWeight:
    """One tensor of the file and the transformers name it loads as."""

    hf_name: str
    info: GGUFTensorInfo


@dataclass(frozen=True)
class GGUFWeights:
    """Every tensor of one GGUF file, mapped and checked, not yet read."""

    gguf: GGUFFile
    names: ArchitectureNames
    num_heads: int  # for undoing llama.cpp's rope row order on q_proj
    num_kv_heads: int  # ... and on k_proj
    weights: tuple[GGUFWeight, ...]

    def iterate(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (transformers name, tensor in `dtype`) one tensor at a time, in file order."""
        for weight in self.weights:
            yield weight.hf_name, self.load(weight, dtype)

    def load(self, weight: GGUFWeight, dtype: torch.dtype) -> torch.Tensor:
        tensor = _restore(self, weight.hf_name, dequantize(self.gguf, weight.info))
        return tensor.to(dtype).contiguous()


def plan_gguf_weights(gguf: GGUFFile, num_heads: int, num_kv_heads: int) -> GGUFWeights:
    """Map every tensor of the file to its transformers name, or fail before reading any data."""
    names = ARCHITECTURES[architecture_of(gguf)]
    num_splits = gguf.metadata.get("split.count", 1)
    if num_splits != 1:
        raise ModelLoadError(
            f"{gguf.path}: is one part of a model split in {num_splits} files; merge them first "
            f"(llama-gguf-split --merge)"
        )
    weights = tuple(
        GGUFWeight(_mapped_name(gguf, names, info), info)
        for info in gguf.tensors
        if info.name not in names.config_tensors
    )
    plan = GGUFWeights(gguf, names, num_heads, num_kv_heads, weights)
    for weight in weights:
        _check_weight(plan, weight)
    return plan


def dequantize(gguf: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    """The tensor's values as float32, in torch order; a fresh array, never a view of the file."""
    block_size, block_bytes = GGML_QUANT_SIZES[info.ggml_type]
    rows = gguf.tensor_bytes(info).reshape(-1, info.shape[-1] // block_size * block_bytes)
    values = gguf_quants.dequantize(rows, info.ggml_type).reshape(info.shape)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map
        values = np.array(values)
    return torch.from_numpy(values.astype(np.float32, copy=False))


def unpermute_rope_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order for rope.

    Within each head of d rows, llama.cpp stores transformers' row (half * d/2 + i) at row
    (2 * i + half): the two rotated halves interleaved. Reading the rows as [head, i, half] and
    swapping the last two gives [head, half, i], transformers' order.
    """
    head_dim = tensor.shape[0] // num_heads
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def _restore(plan: GGUFWeights, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Undo the value transforms llama.cpp's converter applied to this tensor (in float32)."""
    if plan.names.offset_norms and name.endswith("norm.weight"):
        return tensor - 1.0
    if plan.names.rope_permuted and ".self_attn.q_proj." in name:
        return unpermute_rope_rows(tensor, plan.num_heads)
    if plan.names.rope_permuted and ".self_attn.k_proj." in name:
        return unpermute_rope_rows(tensor, plan.num_kv_heads)
    return tensor


def _mapped_name(gguf: GGUFFile, names: ArchitectureNames, info: GGUFTensorInfo) -> str:
    mapped = hf_name(names, info.name)
    if mapped is None:
        raise ModelLoadError(
            f"{gguf.path}: tensor {info.name!r} has no transformers counterpart in a "
            f"{names.hf_architecture} model (unsupported variant of the architecture?)"
        )
    return mapped


def _check_weight(plan: GGUFWeights, weight: GGUFWeight) -> None:
    info = weight.info
    if info.ggml_type not in DEQUANTIZABLE_TYPES:
        raise ModelLoadError(
            f"{plan.gguf.path}: tensor {info.name!r} is stored as {info.ggml_type.name}, "
            f"which this loader cannot dequantize"
        )
    if plan.names.rope_permuted and ".self_attn.q_proj." in weight.hf_name:
        _check_rope_rows(plan, info, plan.num_heads)
    if plan.names.rope_permuted and ".self_attn.k_proj." in weight.hf_name:
        _check_rope_rows(plan, info, plan.num_kv_heads)


def _check_rope_rows(plan: GGUFWeights, info: GGUFTensorInfo, num_heads: int) -> None:
    if num_heads == 0 or info.shape[0] % (2 * num_heads):
        raise ModelLoadError(
            f"{plan.gguf.path}: tensor {info.name!r} has {info.shape[0]} rows, which do not "
            f"split into {num_heads} heads of an even size"
        )
