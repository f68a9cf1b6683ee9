import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from enduro import LLM
from enduro.bench.quantization import (
    QuantizationResult,
    perplexity,
    quantization_table,
    reference_text,
    run_quantization_benchmark,
)

TOKENS = [5, 17, 42, 8, 99, 3, 250, 11, 7, 300, 12, 6, 40, 41, 42, 43, 44, 45, 46, 47]


def test_reference_text_ships_with_the_package() -> None:
    text = reference_text()
    assert text.startswith('"TOM!"') and text.rstrip().endswith('"Y-o-u-u TOM!"')
    assert len(text.split()) == 201


def test_perplexity_equals_transformers_cross_entropy(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    path = tiny_model_dir("llama")
    ours = perplexity(LLM(str(path), dtype="float32", num_blocks=64), TOKENS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([TOKENS])
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    assert ours == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_benchmark_measures_each_setting(tiny_model_dir: Callable[[str], Path]) -> None:
    path = str(tiny_model_dir("llama"))
    results = run_quantization_benchmark(
        path, ["none", "int4-head"], [1, 2], 4, dtype="bfloat16", token_ids=TOKENS
    )
    assert [r.setting for r in results] == ["none", "int4-head"]
    assert all(set(r.tokens_per_s) == {1, 2} and min(r.tokens_per_s.values()) > 0 for r in results)
    # Near-uniform predictions on random weights: perplexity near the vocabulary size (512).
    assert all(300 < r.perplexity < 900 for r in results)
    assert results[0].perplexity != results[1].perplexity


def test_table_gives_ratios_to_the_first_setting() -> None:
    results = [
        QuantizationResult("none", {1: 16.0, 16: 200.0}, 65.0),
        QuantizationResult("int4-head", {1: 32.0, 16: 150.0}, 68.25),
    ]
    table = quantization_table(results, 64)
    cells = [list(column.cells) for column in table.columns]
    assert cells[0] == ["none", "int4-head"]
    assert cells[1] == ["16.0 (1.00x)", "32.0 (2.00x)"]
    assert cells[2] == ["200.0 (1.00x)", "150.0 (0.75x)"]
    assert cells[3] == ["65.00 (+0.0%)", "68.25 (+5.0%)"]
