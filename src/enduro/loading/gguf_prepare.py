"""Turning a GGUF file into a prepared directory: safetensors weights, config.json, tokenizer.

The weights are dequantized one tensor at a time and streamed into model.safetensors, whose header
is written first from the GGUF tensor table, so the dequantized model never sits in memory whole.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from enduro.loading.gguf import GGUFWeights, plan_gguf_weights
from enduro.loading.gguf_config import hf_config_from_gguf
from enduro.loading.gguf_reader import GGUFFile
from enduro.loading.gguf_tokenizer import save_gguf_tokenizer
from enduro.loading.prepared_cache import CONFIG_FILE, WEIGHTS_FILE, PreparedContents
from enduro.loading.safetensors_writer import TensorSpec, write_safetensors

Progress = Callable[[str, int, int], None]


def plan_from_gguf(gguf: GGUFFile) -> tuple[dict[str, Any], GGUFWeights]:
    """The file's config and weight plan, both validated before any tensor is read."""
    config = hf_config_from_gguf(gguf)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    return config, plan_gguf_weights(gguf, heads, kv_heads)


def prepare_gguf(
    gguf: GGUFFile, dtype: torch.dtype, directory: Path, progress: Progress | None = None
) -> PreparedContents:
    """Write the prepared form of `gguf` in `dtype` into the empty `directory`."""
    report = progress or _no_progress
    config, plan = plan_from_gguf(gguf)
    specs = [TensorSpec(weight.hf_name, dtype, weight.info.shape) for weight in plan.weights]
    stage = f"Dequantizing {gguf.path.name}"
    weights = _reported(plan.iterate(dtype), report, stage, len(specs))
    weights_bytes = write_safetensors(directory / WEIGHTS_FILE, specs, weights)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    report("Building tokenizer", 0, 1)
    tokenizer_dir = save_gguf_tokenizer(gguf, directory)
    report("Building tokenizer", 1, 1)
    return PreparedContents(len(specs), weights_bytes, tokenizer_dir is not None)


def _reported(
    weights: Iterator[tuple[str, torch.Tensor]], report: Progress, stage: str, total: int
) -> Iterator[tuple[str, torch.Tensor]]:
    report(stage, 0, total)
    for done, weight in enumerate(weights, start=1):
        yield weight
        report(stage, done, total)  # runs once the consumer has written this tensor


def _no_progress(stage: str, done: int, total: int) -> None:
    pass
