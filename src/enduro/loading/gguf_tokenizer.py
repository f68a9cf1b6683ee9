"""A GGUF file's tokenizer, rebuilt with transformers' GGUF tokenizer support and saved to disk.

transformers knows how each llama.cpp vocabulary type maps onto a `tokenizers` pipeline
(`convert_gguf_tokenizer`); it is fed here from our own metadata reader, which is several times
faster than `AutoTokenizer.from_pretrained(dir, gguf_file=...)` reading the file again itself.
The result is saved with `save_pretrained`, so later starts load tokenizer.json directly.
"""

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)

from enduro.loading.errors import ModelLoadError
from enduro.loading.gguf_reader import GGUFFile

# Special token roles → the GGUF metadata key holding each one's id.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def has_tokenizer(gguf: GGUFFile) -> bool:
    return isinstance(gguf.metadata.get("tokenizer.ggml.tokens"), list)


def save_gguf_tokenizer(gguf: GGUFFile, directory: Path) -> Path | None:
    """Write the file's tokenizer into `directory`; None if the file ships no vocabulary."""
    if not has_tokenizer(gguf):
        return None
    vocabulary = _grouped(gguf, "tokenizer")
    init_kwargs = _grouped(gguf, "tokenizer_config") | _special_tokens(gguf, vocabulary["tokens"])
    architecture = str(gguf.metadata.get("general.architecture"))
    if vocabulary.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        init_kwargs.setdefault("add_bos_token", True)
    try:
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, vocabulary)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra_kwargs)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ModelLoadError(f"{gguf.path}: cannot build its tokenizer ({error})") from error
    tokenizer.save_pretrained(directory)
    return directory


def _grouped(gguf: GGUFFile, group: str) -> dict[str, Any]:
    """The metadata transformers' mapping renames into `group`'s keyword arguments."""
    renames = GGUF_TOKENIZER_MAPPING[group]
    return {
        name: gguf.metadata[f"tokenizer.{key}"]
        for key, name in renames.items()
        if f"tokenizer.{key}" in gguf.metadata
    }


def _special_tokens(gguf: GGUFFile, tokens: list[str]) -> dict[str, str]:
    special: dict[str, str] = {}
    for role, key in _SPECIAL_TOKEN_IDS.items():
        token_id = gguf.metadata.get(key)
        if token_id is None:
            continue
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise ModelLoadError(f"{gguf.path}: {key} = {token_id!r} is not a token id")
        special[role] = tokens[token_id]
    return special
