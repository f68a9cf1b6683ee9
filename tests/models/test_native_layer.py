"""A decode step through the native decoder layers against the module path, per architecture."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from enduro import LLM
from enduro.models.decoder_layers import PreNormDecoderLayer, SandwichNormDecoderLayer
from enduro.models.native_layer import attach_native_decode
from enduro.runner.attention_inputs import build_attention_metadata
from tests.conftest import ARCHITECTURES


@pytest.mark.parametrize("quantization", ["none", "int8", "w8a8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_native_decode_step_matches_the_module_path(
    arch: str, quantization: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    llm = LLM(str(tiny_model_dir(arch)), dtype="bfloat16", quantization=quantization, num_blocks=64)
    runner = llm.engine.runner
    model, kv, windows = runner.model, runner.kv_cache.layers, runner.windows
    assert runner.num_native_layers == len(model.layers) == 3
    # Three requests of 37, 70 and 5 tokens of context (past Gemma 3's tiny sliding window),
    # blocks out of order; prefill, then one decode step each way from the same caches.
    tables = [[9, 2, 30], [4, 40, 11, 5, 21], [17]]
    lens = [37, 70, 5]
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 500, (n + 1,), generator=generator) for n in lens]
    attn, positions = build_attention_metadata(lens, lens, tables, 16, windows)
    step, step_positions = build_attention_metadata(
        [1, 1, 1], [n + 1 for n in lens], tables, 16, windows
    )
    step_ids = torch.stack([i[-1] for i in ids])
    layers = [
        m for m in model.layers if isinstance(m, PreNormDecoderLayer | SandwichNormDecoderLayer)
    ]
    natives = [layer.native_decode for layer in layers]
    logits, caches = {}, {}
    with torch.inference_mode():
        model(torch.cat([i[:-1] for i in ids]), positions, attn, kv)
        for native in (False, True):
            for layer, decode in zip(layers, natives, strict=True):
                layer.native_decode = decode if native else None
            hidden = model(step_ids, step_positions, step, kv)
            logits[native] = model.compute_logits(hidden)
            slots = step.slot_mapping
            caches[native] = [c.view(-1, *c.shape[2:])[slots].clone() for pair in kv for c in pair]
    # The K/V written this step: q/k norms, rotary and the cache write round where the module
    # path does, and the layers before agree but for the activation (float32 formulas apart).
    for native_kv, module_kv in zip(caches[True], caches[False], strict=True):
        assert float((native_kv.float() - module_kv.float()).abs().max()) <= 0.02
    assert torch.equal(caches[True][0], caches[False][0])  # layer 0's K: no activation before
    scale = max(float(logits[False].abs().max()), 1.0)
    assert float((logits[True] - logits[False]).abs().max()) <= 0.02 * scale
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))


def test_layers_with_other_projections_keep_the_module_path(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    for quantization in ("int4", "int4-head"):
        llm = LLM(
            str(tiny_model_dir("llama")),
            dtype="bfloat16",
            quantization=quantization,
            num_blocks=16,
        )
        # int4 layers have no native projection; int4-head leaves the bf16 layers native.
        expected = 0 if quantization == "int4" else 3
        assert llm.engine.runner.num_native_layers == expected
    fp32 = LLM(str(tiny_model_dir("llama")), dtype="float32", num_blocks=16)
    assert fp32.engine.runner.num_native_layers == 0
    assert attach_native_decode(fp32.engine.runner.model, None) == 0
