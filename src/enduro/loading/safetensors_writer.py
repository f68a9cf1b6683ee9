"""Writing a .safetensors file one tensor at a time.

The format is a u64 little-endian header length, a JSON header giving each tensor's dtype, shape
and byte range, then the raw bytes back to back. When every name, dtype and shape is known up front
(a GGUF tensor table states them), the header can be written first and each tensor's bytes as it is
produced, so the whole model never has to sit in memory to be saved.
"""

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

# torch dtype → safetensors dtype name (the float types a prepared model can be stored in).
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
_HEADER_ALIGNMENT = 8  # the header is padded with spaces so tensor data starts 8-byte aligned


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer has promised in the header: it must arrive with exactly this shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def write_safetensors(
    path: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Write `tensors` (in `specs` order, each matching its spec) to `path`; return the file size.

    The file is flushed and fsynced, so once this returns its bytes are on disk.
    """
    header = _header(specs)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        num_written = 0
        for name, tensor in tensors:
            if num_written == len(specs):
                raise ValueError(f"{path}: more tensors than the {len(specs)} in the header")
            _check_matches(specs[num_written], name, tensor)
            out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            num_written += 1
        if num_written != len(specs):
            raise ValueError(f"{path}: got {num_written} tensors for {len(specs)} in the header")
        out.flush()
        os.fsync(out.fileno())
        return out.tell()


def _header(specs: Sequence[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    start = 0
    for spec in specs:
        end = start + spec.num_bytes
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [start, end],
        }
        start = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % _HEADER_ALIGNMENT)


def _check_matches(spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
    if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
        raise ValueError(
            f"tensor {name!r} {tensor.dtype} {tuple(tensor.shape)} does not match the header's "
            f"{spec.name!r} {spec.dtype} {spec.shape}"
        )
