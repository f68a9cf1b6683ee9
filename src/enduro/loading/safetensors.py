"""Safetensors weights as an iterator of (name, tensor): HF model directories and prepared files.

`safe_open` maps the file and hands out one tensor at a time, so iterating never holds more than
the tensor being yielded (and, when the dtype changes, its converted copy).
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from enduro.loading.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(directory: Path) -> tuple[Path, ...]:
    """The weight files of an HF model directory.

    The shard index names them when there is one; otherwise model.safetensors alone; otherwise
    every *.safetensors. The order matters only for the order tensors are yielded in.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        return _indexed_files(index)
    if (directory / SINGLE_FILE).is_file():
        return (directory / SINGLE_FILE,)
    files = tuple(sorted(directory.glob("*.safetensors")))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weights in the directory")
    return files


def count_tensors(files: Sequence[Path]) -> int:
    """How many tensors the files hold; reads only their headers, so it also validates them."""
    total = 0
    for path in files:
        with _opened(path) as handle:
            total += len(handle.keys())
    return total


def iter_safetensors(
    files: Sequence[Path], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) file by file; floating-point tensors are converted to `dtype`."""
    for path in files:
        with _opened(path) as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = _read(path, handle, name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _indexed_files(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"{index}: not a valid shard index ({error})") from error
    files = tuple(index.parent / name for name in names)
    if missing := [path.name for path in files if not path.is_file()]:
        raise ModelLoadError(f"{index}: names shards that are missing: {missing}")
    return files


def _opened(path: Path) -> Any:  # safe_open's handle type is not exported
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({error})") from error


def _read(path: Path, handle: Any, name: str) -> torch.Tensor:
    try:
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({error})") from error
