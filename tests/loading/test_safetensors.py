"""HF directories load tensor by tensor; the streaming writer produces standard safetensors."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enduro.loading.errors import ModelLoadError
from enduro.loading.loader import open_model, resolve_model_path
from enduro.loading.safetensors_writer import TensorSpec, write_safetensors
from tests.conftest import build_tiny_hf_model


def test_hf_directory(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    directory = tiny_model_dir("qwen2")
    files = open_model(str(directory), torch.bfloat16, cache_dir=tmp_path / "cache")
    assert files.hf_config == json.loads((directory / "config.json").read_text())
    saved = load_file(directory / "model.safetensors")
    loaded = dict(files.weights())
    assert files.num_weights == len(loaded) == len(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name
    assert files.tokenizer_dir == directory  # the tiny models ship a tokenizer.json
    assert files.source == directory.resolve()
    assert not (tmp_path / "cache").exists()  # an HF directory needs no preparing


def test_sharded_directory_yields_every_tensor_once(tmp_path: Path) -> None:
    model = build_tiny_hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "tokenizer.json").write_text("{}")
    files = open_model(str(tmp_path), torch.float32)
    names = [name for name, _ in files.weights()]
    assert sorted(names) == sorted(model.state_dict())
    assert files.num_weights == len(names)
    assert files.tokenizer_dir == tmp_path.resolve()


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        open_model(str(tmp_path), torch.float32)


def test_directory_without_config(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"config\.json: cannot read the model config"):
        open_model(str(tmp_path), torch.float32)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        open_model(str(tmp_path), torch.float32)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file or directory"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):
        open_model(str(tmp_path), torch.int8)


def test_streaming_writer_matches_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2).to(torch.float16),
    }
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    size = write_safetensors(tmp_path / "w.safetensors", specs, iter(tensors.items()))
    assert size == (tmp_path / "w.safetensors").stat().st_size
    header_length = int.from_bytes((tmp_path / "w.safetensors").read_bytes()[:8], "little")
    assert header_length % 8 == 0
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())


def test_streaming_writer_rejects_a_tensor_unlike_its_spec(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2, 2))]
    with pytest.raises(ValueError, match="does not match"):
        write_safetensors(tmp_path / "w.safetensors", specs, iter([("a", torch.zeros(4))]))
    with pytest.raises(ValueError, match="got 0 tensors for 1"):
        write_safetensors(tmp_path / "w.safetensors", specs, iter([]))
