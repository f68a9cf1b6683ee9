"""The prepared-weights cache: built once, trusted only when complete, rebuilt when stale."""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import enduro.loading.loader as loader
from enduro.loading.errors import ModelLoadError
from enduro.loading.loader import ModelFiles, open_model
from enduro.loading.prepared_cache import MARKER_FILE, WEIGHTS_FILE, cache_key
from tests.conftest import build_tiny_hf_model
from tests.loading.gguf_writer import write_tiny_gguf


@pytest.fixture
def gguf_path(tmp_path: Path) -> Path:
    model = build_tiny_hf_model("llama")
    return write_tiny_gguf(model, model.config, tmp_path / "llama.gguf", "llama")


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every directory the loader prepares a GGUF file into, in order."""
    built: list[Path] = []
    prepare = loader.prepare_gguf

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args[2])
        return prepare(*args, **kwargs)

    monkeypatch.setattr(loader, "prepare_gguf", counting)
    return built


def _open(path: Path, cache: Path, dtype: torch.dtype = torch.float32) -> ModelFiles:
    return open_model(str(path), dtype, cache_dir=cache)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "prepared").iterdir() if not p.name.startswith("."))


def _weights(files: ModelFiles) -> dict[str, torch.Tensor]:
    return dict(files.weights())


def test_second_open_is_served_from_the_cache(
    tmp_path: Path, gguf_path: Path, builds: list[Path]
) -> None:
    first = _open(gguf_path, tmp_path / "cache")
    second = _open(gguf_path, tmp_path / "cache")
    assert len(builds) == 1
    assert second.hf_config == first.hf_config
    assert second.num_weights == first.num_weights
    first_weights, second_weights = _weights(first), _weights(second)
    assert all(torch.equal(first_weights[name], t) for name, t in second_weights.items())
    entry = tmp_path / "cache" / "prepared" / cache_key(gguf_path, torch.float32).digest
    assert sorted(p.name for p in entry.iterdir()) == ["complete.json", "config.json", WEIGHTS_FILE]


def test_dtype_is_part_of_the_key(tmp_path: Path, gguf_path: Path, builds: list[Path]) -> None:
    _open(gguf_path, tmp_path / "cache", torch.float32)
    _open(gguf_path, tmp_path / "cache", torch.bfloat16)
    assert len(builds) == 2
    assert len(_entries(tmp_path / "cache")) == 2


def test_changed_mtime_makes_a_new_entry_and_drops_the_old(
    tmp_path: Path, gguf_path: Path, builds: list[Path]
) -> None:
    _open(gguf_path, tmp_path / "cache")
    _open(gguf_path, tmp_path / "cache", torch.bfloat16)
    old_key = cache_key(gguf_path, torch.float32)
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    new_key = cache_key(gguf_path, torch.float32)
    assert new_key.digest != old_key.digest
    _open(gguf_path, tmp_path / "cache")
    assert len(builds) == 3
    # Both entries of the old file go, the bf16 one included: the file they came from is gone.
    assert _entries(tmp_path / "cache") == [new_key.digest]


def test_entry_without_marker_is_rebuilt(
    tmp_path: Path, gguf_path: Path, builds: list[Path]
) -> None:
    expected = _weights(_open(gguf_path, tmp_path / "cache"))
    entry = tmp_path / "cache" / "prepared" / cache_key(gguf_path, torch.float32).digest
    (entry / MARKER_FILE).unlink()
    rebuilt = _open(gguf_path, tmp_path / "cache")
    assert len(builds) == 2
    assert (entry / MARKER_FILE).is_file()
    assert all(torch.equal(expected[name], t) for name, t in _weights(rebuilt).items())


def test_entry_with_short_weights_is_rebuilt(
    tmp_path: Path, gguf_path: Path, builds: list[Path]
) -> None:
    _open(gguf_path, tmp_path / "cache")
    entry = tmp_path / "cache" / "prepared" / cache_key(gguf_path, torch.float32).digest
    with (entry / WEIGHTS_FILE).open("r+b") as weights:
        weights.truncate(100)
    _open(gguf_path, tmp_path / "cache")
    assert len(builds) == 2


def test_crash_mid_build_leaves_nothing_trusted(
    tmp_path: Path, gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(stage: str, done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt  # as if the process were stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        open_model(str(gguf_path), torch.float32, cache_dir=tmp_path / "cache", progress=crash)
    assert _entries(tmp_path / "cache") == []
    assert not list((tmp_path / "cache" / "prepared").glob(".*.building"))
    assert _open(gguf_path, tmp_path / "cache").num_weights == 30


def test_progress_reports_every_tensor(tmp_path: Path, gguf_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    open_model(str(gguf_path), torch.float32, tmp_path / "cache", lambda *c: calls.append(c))
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["Dequantizing llama.gguf", "Building tokenizer"]
    dequantizing = [(done, total) for stage, done, total in calls if stage == stages[0]]
    assert dequantizing == [(done, 30) for done in range(31)]


def test_cache_dir_from_environment(
    tmp_path: Path, gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENDURO_CACHE_DIR", str(tmp_path / "from-env"))
    open_model(str(gguf_path), torch.float32)
    assert len(_entries(tmp_path / "from-env")) == 1


def test_unwritable_cache_is_a_model_load_error(tmp_path: Path, gguf_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    with pytest.raises(ModelLoadError, match="cannot write the prepared-weights cache"):
        _open(gguf_path, blocker)


def test_marker_records_the_key(tmp_path: Path, gguf_path: Path) -> None:
    _open(gguf_path, tmp_path / "cache")
    key = cache_key(gguf_path, torch.float32)
    marker = json.loads((tmp_path / "cache" / "prepared" / key.digest / MARKER_FILE).read_text())
    assert marker["key"]["source"] == str(gguf_path.resolve())
    assert marker["key"]["quantization"] == "none"
    assert marker["contents"]["num_weights"] == 30
