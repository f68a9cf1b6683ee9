"""Our paged models against transformers on the same tiny random weights, in float32.

Requests run the way the engine runs them: several prompts prefilled in one forward, then
decode steps for all of them together, block size 4, block ids shuffled, and a KV cache
filled with garbage so that reading a slot nobody wrote changes the logits.
"""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from enduro.models.arch_config import ArchConfig
from enduro.models.attention import KVCache
from enduro.models.base import CausalLM
from enduro.models.registry import build_model
from enduro.models.rope_config import LinearScaling, Llama3Scaling
from enduro.models.rotary import RotaryEmbedding
from enduro.runner.attention_inputs import build_attention_metadata
from tests.conftest import ARCHITECTURES
from tests.models.tiny_llama3 import (
    BLENDED,
    DIVIDED,
    KEPT,
    LLAMA3_ROPE,
    build_tiny_llama3,
    unscaled_inv_freq,
)

BLOCK_SIZE = 4
NUM_BLOCKS = 40
PROMPT_LENS = (5, 11, 17)  # the longer two exceed the tiny Gemma 3 window of 8
NUM_DECODE_STEPS = 20
TOLERANCE = 1e-4


def load_model(model_dir: Path) -> CausalLM:
    arch = ArchConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    model = build_model(arch, torch.float32)
    model.load_weights(load_file(model_dir / "model.safetensors").items())
    return model


def garbage_kv_caches(arch: ArchConfig) -> list[KVCache]:
    generator = torch.Generator().manual_seed(7)
    shape = (NUM_BLOCKS, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
    return [
        (torch.randn(shape, generator=generator) * 10, torch.randn(shape, generator=generator) * 10)
        for _ in range(arch.num_layers)
    ]


def shuffled_block_tables(num_tokens: list[int]) -> list[list[int]]:
    """Enough blocks for each request, taken in a shuffled order so no table is contiguous."""
    block_ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3)).tolist()
    tables = []
    for n in num_tokens:
        num_blocks = math.ceil(n / BLOCK_SIZE)
        tables.append(block_ids[:num_blocks])
        block_ids = block_ids[num_blocks:]
    return tables


def run_step(
    model: CausalLM,
    kv_caches: list[KVCache],
    new_tokens: list[list[int]],
    num_computed: list[int],
    block_tables: list[list[int]],
) -> torch.Tensor:
    """One forward over every request's new tokens → float32 logits of each, [T, vocab]."""
    query_lens = [len(tokens) for tokens in new_tokens]
    seq_lens = [c + q for c, q in zip(num_computed, query_lens, strict=True)]
    # Tables hold only the blocks the context needs so far, as the engine's do.
    tables = [t[: math.ceil(s / BLOCK_SIZE)] for t, s in zip(block_tables, seq_lens, strict=True)]
    windows = model.arch.sliding_windows
    attn, positions = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, windows)
    input_ids = torch.tensor([token for tokens in new_tokens for token in tokens])
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, attn, kv_caches))


def random_prompts(vocab_size: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def generate(model: CausalLM, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Batched prefill, then greedy decode steps for all requests at once.

    Returns each request's full token sequence and our logits [R, 1 + steps, vocab]: for the
    last prompt token, then for every decoded token.
    """
    tables = shuffled_block_tables([len(p) + NUM_DECODE_STEPS for p in prompts])
    kv_caches = garbage_kv_caches(model.arch)
    sequences = [list(p) for p in prompts]
    logits = run_step(model, kv_caches, prompts, [0] * len(prompts), tables)
    last_rows = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    steps = [logits[last_rows]]  # [R, vocab] per step
    for _ in range(NUM_DECODE_STEPS):
        next_tokens = steps[-1].argmax(-1).tolist()
        for sequence, token in zip(sequences, next_tokens, strict=True):
            sequence.append(token)
        num_computed = [len(s) - 1 for s in sequences]
        steps.append(run_step(model, kv_caches, [[t] for t in next_tokens], num_computed, tables))
    return sequences, torch.stack(steps, dim=1)


def max_diff_to_transformers(
    hf_model: Any, prompts: list[list[int]], sequences: list[list[int]], ours: torch.Tensor
) -> float:
    """Largest |ours - transformers| over every compared logit; HF runs each full sequence."""
    diffs = []
    for prompt, sequence, our_logits in zip(prompts, sequences, ours, strict=True):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([sequence])).logits[0, len(prompt) - 1 :]
        assert expected.shape == our_logits.shape
        diffs.append(float((expected - our_logits).abs().max()))
    return max(diffs)


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_batched_prefill_and_decode_match_transformers(arch_name: str, tiny_model_dir: Any) -> None:
    model_dir = tiny_model_dir(arch_name)
    model = load_model(model_dir)
    prompts = random_prompts(model.arch.vocab_size, PROMPT_LENS)
    sequences, ours = generate(model, prompts)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert max_diff_to_transformers(hf_model, prompts, sequences, ours) < TOLERANCE


def test_gemma3_final_softcap_and_linear_rope_match_transformers(tmp_path: Path) -> None:
    """Paths the tiny conftest Gemma leaves off: final-logit softcap, linear rope scaling."""
    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=20,
        final_logit_softcapping=5.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
    )
    torch.manual_seed(0)
    hf_model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.arch.final_logit_softcap == 5.0
    assert model.arch.ropes[1].scaling == LinearScaling(4.0)
    prompts = random_prompts(model.arch.vocab_size, PROMPT_LENS)
    sequences, ours = generate(model, prompts)
    assert max_diff_to_transformers(hf_model, prompts, sequences, ours) < TOLERANCE


def test_llama3_rope_matches_transformers(tmp_path: Path) -> None:
    """Llama 3 rope scaling: the frequencies equal transformers' exactly in all three bands."""
    build_tiny_llama3().save_pretrained(tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = load_model(tmp_path)
    params = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    assert model.arch.ropes[0].scaling == Llama3Scaling(**params)

    (rotary,) = model.rotary_embs
    assert isinstance(rotary, RotaryEmbedding)
    inv_freq, unscaled = rotary.inv_freq, unscaled_inv_freq()
    assert torch.equal(inv_freq, hf_model.model.rotary_emb.inv_freq)
    assert torch.equal(inv_freq[KEPT], unscaled[KEPT])
    assert torch.equal(inv_freq[DIVIDED], unscaled[DIVIDED] / 8.0)
    assert (unscaled[BLENDED] / 8.0 < inv_freq[BLENDED]).all()
    assert (inv_freq[BLENDED] < unscaled[BLENDED]).all()

    prompts = random_prompts(model.arch.vocab_size, PROMPT_LENS)
    sequences, ours = generate(model, prompts)
    assert max_diff_to_transformers(hf_model, prompts, sequences, ours) < TOLERANCE


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_chunked_prefill_matches_one_forward(arch_name: str, tiny_model_dir: Any) -> None:
    model = load_model(tiny_model_dir(arch_name))
    prompt, other = random_prompts(model.arch.vocab_size, (17, 6))
    tables = shuffled_block_tables([17, 6])
    whole = run_step(model, garbage_kv_caches(model.arch), [prompt], [0], tables[:1])

    kv_caches = garbage_kv_caches(model.arch)
    first = run_step(model, kv_caches, [prompt[:7]], [0], tables[:1])
    # The second chunk shares its step with another request's whole prompt.
    second = run_step(model, kv_caches, [prompt[7:], other], [7, 0], tables)[:10]
    assert float((torch.cat([first, second]) - whole).abs().max()) < 1e-5


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_a_step_mixing_decode_and_prompts_matches_separate_steps(
    arch_name: str, tiny_model_dir: Any
) -> None:
    """A decode request between two prompts in one step: the step attends in two parts
    (`AttentionMetadata.parts`), and each request's logits equal those of its own step."""
    model = load_model(tiny_model_dir(arch_name))
    decoding, prompt, chunked = random_prompts(model.arch.vocab_size, (11, 6, 17))
    table_a, table_b, table_c = shuffled_block_tables([11, 6, 17])

    def cache_after_the_first_prompt() -> list[KVCache]:
        kv_caches = garbage_kv_caches(model.arch)
        run_step(model, kv_caches, [decoding[:10]], [0], [table_a])
        return kv_caches

    kv_caches = cache_after_the_first_prompt()
    alone = [
        run_step(model, kv_caches, [[decoding[10]]], [10], [table_a]),
        run_step(model, kv_caches, [prompt], [0], [table_b]),
        run_step(model, kv_caches, [chunked[:9]], [0], [table_c]),
    ]
    mixed = run_step(
        model,
        cache_after_the_first_prompt(),
        [prompt, [decoding[10]], chunked[:9]],
        [0, 10, 0],
        [table_b, table_a, table_c],
    )
    expected = torch.cat([alone[1], alone[0], alone[2]])
    assert mixed.shape == expected.shape == (16, model.arch.vocab_size)
    assert float((mixed - expected).abs().max()) < 1e-5
