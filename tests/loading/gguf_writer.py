"""Write a transformers model as a GGUF file the way llama.cpp's converter would.

Names come from llama.cpp's own mapping (`gguf.get_tensor_name_map`, the table its converter
uses), not from enduro's, so a round trip through enduro's loader checks enduro's name map against
llama.cpp's. The value transforms are re-implemented from the converter's behaviour:

- Gemma: every `*norm.weight` is stored as 1 + w (llama.cpp's RMSNorm scales by the weight,
  Gemma's by 1 + weight).
- Llama: the rows of each head of q_proj / k_proj are reordered from the half-split rope layout
  to the interleaved one (row `half * d/2 + i` goes to row `2 * i + half`).
- Llama with rope_type "llama3": the scaling is written not as metadata but as a
  `rope_freqs.weight` F32 tensor of what each rope frequency is divided by, ahead of the weights.

Use: `write_tiny_gguf(model, model.config, path, "llama")`, then `open_model(str(path), ...)`.
"""

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from transformers import PretrainedConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

GGUF_ARCHES = {
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "glm4": gguf.MODEL_ARCH.GLM4,
}


def snap_gemma_norms(model: torch.nn.Module) -> None:
    """Round Gemma norm weights in place to values w for which (w + 1) - 1 == w in float32.

    Storing 1 + w in float32 drops w's low bits, so no loader can return the original w exactly.
    Replacing w by fl(fl(w + 1) - 1) first (the subtraction is exact for 1 + w in [0.5, 2]) makes
    the file hold the model's weights exactly: the model and the file then agree bit for bit.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_((param.float() + 1.0) - 1.0)


def write_tiny_gguf(
    model: torch.nn.Module,
    config: PretrainedConfig,
    path: Path,
    arch: str,
    tensor_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    tokenizer: bool = False,
) -> Path:
    """Write `model` (an fp32 transformers model of `arch`) as a GGUF file at `path`.

    For gemma3 the model's norm weights are first snapped in place (see `snap_gemma_norms`) so the
    file holds exactly the model's weights. Matrices are stored as `tensor_type` (quantized with
    gguf.quants where it is not F32), vectors always as F32, as llama.cpp does. `tokenizer` adds
    the byte-level BPE vocabulary of `byte_level_vocab`.
    """
    if arch == "gemma3":
        snap_gemma_norms(model)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, config, arch)
    if tokenizer:
        tokens, merges = byte_level_vocab(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(
            [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
        )
        writer.add_token_merges(merges)
    if arch == "llama" and config.rope_parameters["rope_type"] == "llama3":
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(rope_freqs, llama3_rope_divisors(config))
    name_map = gguf.get_tensor_name_map(GGUF_ARCHES[arch], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"llama.cpp's map has no name for {name}")
        data = _converted(name, tensor.detach().float(), config, arch).numpy()
        _add_tensor(writer, gguf_name, data, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BPE_LETTERS = "abcdefghijklmnop"
NUM_CONTROL_TOKENS = 3  # <pad>, <s>, </s> at ids 0, 1, 2
FIRST_MERGED_ID = NUM_CONTROL_TOKENS + 256


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[str]]:
    """A GPT-2 style vocabulary of exactly `vocab_size` tokens, and its merges.

    Ids 0-2 are <pad>, <s>, </s>; ids 3-258 the 256 byte symbols in byte order (so an ASCII
    letter c has id 3 + ord(c)); then the merge of letter pair (x, y) of "a".."p", ranked
    16 * index(x) + index(y), has id 259 + that rank.
    """
    symbols = bytes_to_unicode()
    tokens = ["<pad>", "<s>", "</s>"] + [symbols[byte] for byte in range(256)]
    pairs = [(x, y) for x in BPE_LETTERS for y in BPE_LETTERS][: vocab_size - len(tokens)]
    return tokens + [x + y for x, y in pairs], [f"{x} {y}" for x, y in pairs]


def permute_for_llama_cpp(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k reorder: within each head, halves [a | b] become pairs a0 b0 a1 b1 ..."""
    head_dim = tensor.shape[0] // num_heads
    halves = tensor.reshape(num_heads, 2, head_dim // 2, *tensor.shape[1:])
    return halves.transpose(1, 2).reshape(tensor.shape)


def llama3_rope_divisors(config: PretrainedConfig) -> np.ndarray:
    """What llama.cpp divides each rope frequency by to get Llama 3 scaling: 1 for wavelengths
    under original / high_freq_factor, `factor` above original / low_freq_factor, and in between
    the reciprocal of the blend (1 - s) / factor + s of the two, computed in float64."""
    rope = config.rope_parameters
    original = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    divisors = []
    for i in range(0, config.head_dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / config.head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            s = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - s) / factor + s))
    return np.array(divisors, dtype=np.float32)


def _converted(
    name: str, tensor: torch.Tensor, config: PretrainedConfig, arch: str
) -> torch.Tensor:
    if arch == "gemma3" and name.endswith("norm.weight"):
        return tensor + 1.0
    if arch == "llama" and ".self_attn.q_proj." in name:
        return permute_for_llama_cpp(tensor, config.num_attention_heads)
    if arch == "llama" and ".self_attn.k_proj." in name:
        return permute_for_llama_cpp(tensor, config.num_key_value_heads)
    return tensor


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, data: np.ndarray, tensor_type: GGMLQuantizationType
) -> None:
    if data.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
        return
    writer.add_tensor(name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)


def _add_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp's converter writes (and two it hard-codes for Gemma 3)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    rope = config.rope_parameters
    if arch == "gemma3":
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_sliding_window(config.sliding_window)
        # llama.cpp hard-codes both of these for Gemma 3 (every 6th layer global, local base
        # 1e4); a 3-layer model with its own pattern needs them in the file.
        sliding = [kind == "sliding_attention" for kind in config.layer_types]
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        return
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "glm4":
        rotary_dims = int(config.head_dim * rope["partial_rotary_factor"])
        writer.add_rope_dimension_count(rotary_dims)
