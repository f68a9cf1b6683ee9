"""Assign checkpoint tensors to a model built on the meta device.

Each model file holds its checkpoint-name map as data: transformers name → (our parameter,
shard). `{i}` in a name stands for the layer index. Shard None means the tensor becomes the
parameter as is (no copy); shard n means it fills rows n of a `MergedLinear` (q|k|v, gate|up),
whose real storage is allocated when its first shard arrives.
"""

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from enduro.models.layers import MergedLinear

# transformers name → (our parameter name, shard index within a fused projection or None)
CheckpointNames = Mapping[str, tuple[str, int | None]]

# Names some checkpoints carry that hold nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expand_names(names: CheckpointNames, num_layers: int) -> dict[str, tuple[str, int | None]]:
    """The map with `{i}` replaced by every layer index."""
    expanded: dict[str, tuple[str, int | None]] = {}
    for ckpt_name, (param_name, shard) in names.items():
        layers = range(num_layers) if "{i}" in ckpt_name else [None]
        for i in layers:
            expanded[ckpt_name.format(i=i)] = (param_name.format(i=i), shard)
    return expanded


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    names: CheckpointNames,
    num_layers: int,
    ignored: frozenset[str] = frozenset(),
) -> None:
    """Assign every named tensor; ValueError naming missing, unexpected or misshapen ones.

    Map entries whose parameter the model lacks (a bias it was built without) are not expected.
    `ignored` names are accepted and dropped (a tied model's `lm_head.weight`).
    """
    params = dict(model.named_parameters())
    expected = {
        ckpt_name: target
        for ckpt_name, target in expand_names(names, num_layers).items()
        if target[0] in params
    }
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if name in expected:
            _assign(model, *expected[name], tensor, name)
            seen.add(name)
        elif name not in ignored and not name.endswith(_IGNORED_SUFFIXES):
            unexpected.append(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    unloaded = [name for name, param in model.named_parameters() if param.is_meta]
    if unloaded:
        raise ValueError(f"parameters the checkpoint-name map does not cover: {unloaded}")


def _assign(
    model: nn.Module, param_name: str, shard: int | None, tensor: torch.Tensor, ckpt_name: str
) -> None:
    module_name, _, attr = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    current: nn.Parameter = getattr(module, attr)
    if shard is None:
        _check_shape(ckpt_name, tensor, tuple(current.shape))
        setattr(module, attr, nn.Parameter(tensor.to(current.dtype), requires_grad=False))
        return
    if not isinstance(module, MergedLinear):
        raise TypeError(f"{param_name} is not a fused projection")
    rows = module.shard_rows(shard)
    _check_shape(ckpt_name, tensor, (rows.stop - rows.start, *current.shape[1:]))
    if current.is_meta:
        storage = torch.empty(current.shape, dtype=current.dtype, device=tensor.device)
        current = nn.Parameter(storage, requires_grad=False)
        setattr(module, attr, current)
    with torch.no_grad():
        current[rows].copy_(tensor)


def _check_shape(ckpt_name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{ckpt_name}: shape {tuple(tensor.shape)}, expected {shape}")
