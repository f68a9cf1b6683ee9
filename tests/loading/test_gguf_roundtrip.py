"""A tiny model written as llama.cpp would write it loads back exactly: config and every tensor."""

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, PretrainedConfig

from enduro.loading.gguf import unpermute_rope_rows
from enduro.loading.loader import open_model
from tests.conftest import ARCHITECTURES, build_tiny_hf_model
from tests.loading.gguf_writer import (
    BPE_LETTERS,
    FIRST_MERGED_ID,
    NUM_CONTROL_TOKENS,
    permute_for_llama_cpp,
    write_tiny_gguf,
)

# Keys a transformers config fills in that say nothing about the model: the class list we add,
# and the dtype the tiny model happened to be built in.
_IGNORED_CONFIG_KEYS = {"architectures", "dtype"}


def _expected_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint a GGUF file holds: a tied model has no separate output projection."""
    config = model.config
    assert isinstance(config, PretrainedConfig)
    tied = config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_exact(tmp_path: Path, arch: str) -> None:
    model = build_tiny_hf_model(arch)
    path = write_tiny_gguf(model, model.config, tmp_path / f"{arch}.gguf", arch)
    files = open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")

    config = transformers.AutoConfig.for_model(**files.hf_config).to_dict()
    original = model.config.to_dict()
    for key in (set(config) | set(original)) - _IGNORED_CONFIG_KEYS:
        assert config.get(key) == original.get(key), key
    assert files.hf_config["architectures"] == [type(model).__name__]

    expected = _expected_weights(model)
    loaded = dict(files.weights())
    assert files.num_weights == len(loaded) == len(expected)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert files.tokenizer_dir is None
    assert files.source == path.resolve()


@pytest.mark.parametrize("arch", ["gemma3", "llama", "qwen2", "qwen3"])
def test_writer_agrees_with_transformers_gguf_loader(tmp_path: Path, arch: str) -> None:
    """An independent check of the test writer's transforms: transformers' own GGUF loader, which
    undoes llama.cpp's Gemma norm offset and Llama q/k permutation, recovers the original weights.
    (transformers cannot load a glm4 GGUF.)"""
    model = build_tiny_hf_model(arch)
    path = write_tiny_gguf(model, model.config, tmp_path / f"{arch}.gguf", arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, config=model.config, dtype=torch.float32
    )
    reference_weights = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reference_weights[name], tensor), name


def test_bf16_weights_are_the_rounded_originals(tmp_path: Path) -> None:
    model = build_tiny_hf_model("gemma3")
    path = write_tiny_gguf(model, model.config, tmp_path / "gemma3.gguf", "gemma3")
    files = open_model(str(path), torch.bfloat16, cache_dir=tmp_path / "cache")
    loaded = dict(files.weights())
    for name, tensor in _expected_weights(model).items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


def test_unpermute_restores_half_split_rows() -> None:
    # One head of 4 rows: transformers' halves [r0 r1 | r2 r3] are stored as r0 r2 r1 r3.
    stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rope_rows(stored, num_heads=1).flatten().tolist() == [0, 1, 2, 3]
    rows = torch.arange(24.0).reshape(12, 2)
    assert torch.equal(unpermute_rope_rows(permute_for_llama_cpp(rows, 3), 3), rows)


def test_gguf_tokenizer_is_saved_and_loads(tmp_path: Path) -> None:
    model = build_tiny_hf_model("qwen3")
    path = write_tiny_gguf(model, model.config, tmp_path / "t.gguf", "qwen3", tokenizer=True)
    files = open_model(str(path), torch.float32, cache_dir=tmp_path / "cache")
    assert files.tokenizer_dir is not None
    tokenizer = AutoTokenizer.from_pretrained(files.tokenizer_dir)
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<s>", "</s>", "<pad>")

    def merged(pair: str) -> int:
        return FIRST_MERGED_ID + 16 * BPE_LETTERS.index(pair[0]) + BPE_LETTERS.index(pair[1])

    # "hello": the best-ranked merge e+l goes first, then l+o; h has no partner left.
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert ids == [NUM_CONTROL_TOKENS + ord("h"), merged("el"), merged("lo")]
    assert tokenizer.decode(ids) == "hello"
