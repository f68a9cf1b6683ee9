"""The GGUF parser: valid files read exactly, malformed ones fail with ModelLoadError only."""

import contextlib
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from transformers.integrations.gguf.reader import GgufHeader

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_prepare import plan_from_gguf
from enduro.loading.gguf_reader import read_gguf
from enduro.loading.loader import open_model
from tests.conftest import build_tiny_hf_model
from tests.loading.gguf_writer import write_tiny_gguf

F32 = int(GGMLQuantizationType.F32)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", 4, value)


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", 8) + _string(value)


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    head = _string(name) + struct.pack("<I", len(dims))
    return head + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)


def raw_gguf(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
) -> bytes:
    """A GGUF file assembled by hand, so every field can be made wrong on purpose."""
    num_tensors = len(infos) if tensor_count is None else tensor_count
    num_kvs = len(kvs) if kv_count is None else kv_count
    header = b"GGUF" + struct.pack("<IQQ", version, num_tensors, num_kvs)
    body = header + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def _valid_parts() -> tuple[list[bytes], list[bytes], bytes]:
    kvs = [_kv_string("general.architecture", "llama"), _kv_u32("llama.block_count", 1)]
    infos = [_tensor_info("a.weight", (4, 2), F32, 0), _tensor_info("b.weight", (8,), F32, 32)]
    data = np.arange(8, dtype=np.float32).tobytes() + np.arange(8, 16, dtype=np.float32).tobytes()
    return kvs, infos, data


def _write(tmp_path: Path, content: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_reads_metadata_shapes_and_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path, raw_gguf(*_valid_parts()))
    gguf = read_gguf(path)
    assert gguf.version == 3
    assert gguf.metadata == {"general.architecture": "llama", "llama.block_count": 1}
    assert [(t.name, t.shape, t.num_bytes) for t in gguf.tensors] == [
        ("a.weight", (2, 4), 32),  # dims are stored innermost first, so (4, 2) is torch (2, 4)
        ("b.weight", (8,), 32),
    ]
    assert gguf.tensor_bytes(gguf.tensors[1]).view(np.float32).tolist() == list(range(8, 16))


def test_float32_metadata_reads_as_the_shortest_decimal(tmp_path: Path) -> None:
    kv = _string("llama.eps") + struct.pack("<If", 6, 1e-6)
    gguf = read_gguf(_write(tmp_path, raw_gguf([kv], [], b"")))
    assert gguf.metadata["llama.eps"] == 1e-6


def test_matches_transformers_reader_on_a_real_writer_file(tmp_path: Path) -> None:
    model = build_tiny_hf_model("qwen3")
    path = write_tiny_gguf(model, model.config, tmp_path / "qwen3.gguf", "qwen3", tokenizer=True)
    ours = read_gguf(path)
    theirs = GgufHeader.from_file(str(path))
    assert [(t.name, t.shape, int(t.ggml_type), t.num_bytes) for t in ours.tensors] == [
        (t.name, t.shape, t.ggml_type, t.nbytes) for t in theirs.tensors
    ]
    assert [t.offset for t in ours.tensors] == [
        theirs.data_start + t.offset for t in theirs.tensors
    ]
    assert ours.metadata["tokenizer.ggml.tokens"][:4] == ["<pad>", "<s>", "</s>", "Ā"]


def _fails(path: Path, *phrases: str) -> None:
    with pytest.raises(ModelLoadError) as raised:
        read_gguf(path)
    message = str(raised.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message


def test_bad_magic(tmp_path: Path) -> None:
    content = b"GGUX" + raw_gguf(*_valid_parts())[4:]
    _fails(_write(tmp_path, content), "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    _fails(_write(tmp_path, raw_gguf(*_valid_parts(), version=version)), f"version {version}")


def test_too_short(tmp_path: Path) -> None:
    _fails(_write(tmp_path, b"GGUF"), "too short")


def test_truncated_in_header(tmp_path: Path) -> None:
    content = raw_gguf(*_valid_parts())
    _fails(_write(tmp_path, content[:40], "counts.gguf"), "truncated")
    kvs, infos, _ = _valid_parts()
    inside_tensor_table = 24 + len(b"".join(kvs)) + len(infos[0]) + 20
    _fails(_write(tmp_path, content[:inside_tensor_table]), "ends inside", "'b.weight'")


def test_truncated_in_tensor_data(tmp_path: Path) -> None:
    content = raw_gguf(*_valid_parts())
    _fails(_write(tmp_path, content[:-4]), "'b.weight'", "truncated")


def test_absurd_string_length(tmp_path: Path) -> None:
    key = struct.pack("<Q", 2**60) + b"general.architecture"
    _fails(_write(tmp_path, raw_gguf([key], [], b"")), "ends inside")


def test_absurd_string_array_length(tmp_path: Path) -> None:
    kv = _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**62)
    _fails(_write(tmp_path, raw_gguf([kv], [], b"")), "claims")


def test_absurd_tensor_count(tmp_path: Path) -> None:
    kvs, infos, data = _valid_parts()
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data, tensor_count=2**62)), "tensor count")


def test_absurd_metadata_count(tmp_path: Path) -> None:
    kvs, infos, data = _valid_parts()
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data, kv_count=2**40)), "metadata count")


def test_unknown_tensor_type(tmp_path: Path) -> None:
    kvs, _, data = _valid_parts()
    infos = [_tensor_info("a.weight", (4, 2), 99, 0)]
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data)), "unknown ggml type 99")


def test_row_not_whole_blocks(tmp_path: Path) -> None:
    kvs, _, data = _valid_parts()
    infos = [_tensor_info("a.weight", (16, 1), int(GGMLQuantizationType.Q8_0), 0)]
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data)), "not a whole number of Q8_0 blocks")


def test_too_many_dimensions(tmp_path: Path) -> None:
    kvs, _, data = _valid_parts()
    infos = [_tensor_info("a.weight", (1, 1, 1, 1, 8), F32, 0)]
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data)), "5 dimensions")


def test_duplicate_and_overlapping_tensors(tmp_path: Path) -> None:
    kvs, _, data = _valid_parts()
    twice = [_tensor_info("a.weight", (8,), F32, 0), _tensor_info("a.weight", (8,), F32, 32)]
    _fails(_write(tmp_path, raw_gguf(kvs, twice, data), "twice.gguf"), "appears twice")
    overlap = [_tensor_info("a.weight", (16,), F32, 0), _tensor_info("b.weight", (8,), F32, 32)]
    _fails(_write(tmp_path, raw_gguf(kvs, overlap, data), "overlap.gguf"), "overlap")


def test_misaligned_offset(tmp_path: Path) -> None:
    kvs, _, data = _valid_parts()
    infos = [_tensor_info("a.weight", (4,), F32, 4)]
    _fails(_write(tmp_path, raw_gguf(kvs, infos, data)), "not 32-aligned")


def test_invalid_utf8_key(tmp_path: Path) -> None:
    kv = struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", 4, 1)
    _fails(_write(tmp_path, raw_gguf([kv], [], b"")), "UTF-8")


def test_open_model_reports_a_non_gguf_file(tmp_path: Path) -> None:
    path = _write(tmp_path, b"not a model at all, just text", "notes.txt")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")


def _read_everything(path: Path) -> None:
    """Everything loading does with a file's contents, short of writing the cache."""
    gguf = read_gguf(path)
    _, plan = plan_from_gguf(gguf)
    for _ in plan.iterate(torch.float32):
        pass


def test_every_truncation_and_random_corruption_fails_cleanly(tmp_path: Path) -> None:
    model = build_tiny_hf_model("llama")
    content = write_tiny_gguf(model, model.config, tmp_path / "ok.gguf", "llama").read_bytes()
    data_start = min(info.offset for info in read_gguf(tmp_path / "ok.gguf").tensors)
    path = tmp_path / "bad.gguf"
    cuts = [*range(0, data_start + 64), len(content) - 1]
    for cut in cuts:
        path.write_bytes(content[:cut])
        with pytest.raises(ModelLoadError):
            _read_everything(path)
    rng = random.Random(0)
    for _ in range(400):  # flipped header bytes: either still loadable or a ModelLoadError
        corrupt = bytearray(content)
        corrupt[rng.randrange(data_start)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(corrupt))
        with contextlib.suppress(ModelLoadError):
            _read_everything(path)
