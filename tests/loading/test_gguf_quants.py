"""Quantized GGUF tensors dequantize exactly as gguf.quants does, and close to the original."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from enduro.loading.gguf import DEQUANTIZABLE_TYPES, dequantize
from enduro.loading.gguf_reader import read_gguf
from enduro.loading.loader import open_model
from tests.conftest import build_tiny_hf_model
from tests.loading.gguf_writer import write_tiny_gguf

Q = GGMLQuantizationType
# The types gguf.quants can also quantize, and the worst error each may make relative to the
# tensor's largest magnitude (half a quantization step, with room for the rounded f16 scale).
QUANTIZABLE_TOLERANCES = {
    Q.F16: 1e-3,
    Q.BF16: 1 / 128,
    Q.Q8_0: 1 / 127,
    Q.Q5_0: 1 / 15,
    Q.Q5_1: 1 / 15,
    Q.Q4_0: 1 / 7,
    Q.Q4_1: 1 / 7,
}


@pytest.mark.parametrize(
    "ggml_type", [pytest.param(t, id=t.name) for t in sorted(DEQUANTIZABLE_TYPES, key=int)]
)
def test_every_accepted_type_dequantizes(ggml_type: GGMLQuantizationType) -> None:
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    values = gguf.quants.dequantize(np.zeros((2, block_bytes), dtype=np.uint8), ggml_type)
    assert values.shape == (2, block_size)
    assert not values.any()


def _write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, ggml_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("ggml_type", [pytest.param(t, id=t.name) for t in QUANTIZABLE_TOLERANCES])
def test_quantized_tensor_reads_back(tmp_path: Path, ggml_type: GGMLQuantizationType) -> None:
    original = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    quantized = gguf.quants.quantize(original, ggml_type)
    raw = quantized.view(np.uint8).reshape(6, -1)  # F16 comes back as float16, not bytes
    _write_tensors(tmp_path / "q.gguf", {"w": (raw, ggml_type)})
    file = read_gguf(tmp_path / "q.gguf")
    (info,) = file.tensors
    assert (info.shape, info.ggml_type) == ((6, 512), ggml_type)
    restored = dequantize(file, info)
    assert torch.equal(restored, torch.from_numpy(gguf.quants.dequantize(raw, ggml_type)))
    error = (restored - torch.from_numpy(original)).abs().max().item()
    assert error <= QUANTIZABLE_TOLERANCES[ggml_type] * np.abs(original).max()


def test_quantized_model_loads_close_to_original(tmp_path: Path) -> None:
    model = build_tiny_hf_model("llama")
    expected = model.state_dict()
    path = write_tiny_gguf(model, model.config, tmp_path / "q8.gguf", "llama", Q.Q8_0)
    files = open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")
    loaded = dict(files.weights())
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        bound = expected[name].abs().max().item() / 127
        assert (tensor - expected[name]).abs().max().item() <= bound, name
