"""Weight-only int8/int4 layers against their dequantized weights, and whole tiny models."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from enduro import LLM, SamplingParams, native
from enduro.models.layers import Linear, PackedLinear
from enduro.models.quantization import (
    WIDENED_MIN_ROWS,
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    quantize_weight,
    w8a8_library,
)
from tests.conftest import ARCHITECTURES
from tests.native.test_native import quantized_rows

PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 7, 300, 12, 6, 40, 41, 42, 43]
# Max |prompt logprob difference| from the bf16 model on the tiny random-weight models (logprobs
# near -ln(512) = -6.2). Measured over the five architectures: int8 ≤ 0.013, w8a8 ≤ 0.012,
# int4 ≤ 0.10.
LOGPROB_TOLERANCE = {"int8": 0.05, "w8a8": 0.05, "int4": 0.3}


def tiny_llm(path: Path, quantization: str) -> LLM:
    return LLM(str(path), dtype="bfloat16", quantization=quantization, num_blocks=64)


def prompt_logprobs(llm: LLM) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    (output,) = llm.generate([PROMPT], params)
    assert output.prompt_logprobs is not None
    return torch.tensor([lp.logprob for lp in output.prompt_logprobs[1:] if lp])


@pytest.mark.parametrize("layer_class", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("bias", [False, True])
# int8 runs in enduro's native kernel, or with native kernels off in torch's.
@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("leading", [(2, 3), (40,), (WIDENED_MIN_ROWS,)])
def test_quantized_linear_matches_dequantized_matmul(
    layer_class: type[Int8Linear] | type[Int4Linear],
    bias: bool,
    use_native: bool,
    leading: tuple[int, ...],
) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=generator).bfloat16()
    b = torch.randn(48, generator=generator).bfloat16() if bias else None
    layer = layer_class(weight, b)
    x = torch.randn(*leading, 96, generator=generator).bfloat16()
    dequantized = layer.dequantized_weight()
    reference = x.float() @ dequantized.T + (b.float() if b is not None else 0.0)
    native.use_native(use_native)
    try:
        out = layer(x)
    finally:
        native.use_native(True)
    assert out.shape == (*leading, 48) and out.dtype == torch.bfloat16
    # Exact but for bf16 rounding (8 significant bits) of the weights, products and output:
    # the error is bounded by a few ulps of sum |x * w|, not of the (cancelling) result.
    magnitude = x.float().abs() @ dequantized.abs().T + (b.float().abs() if b is not None else 0.0)
    assert ((out.float() - reference).abs() <= 2**-7 * magnitude).all()
    # Close to the original: within one step of the widest range (exact bound: half a step
    # of its own row or group, plus bf16 rounding of the scales).
    steps = {Int8Linear: 1 / 127, Int4Linear: 1 / 15}[layer_class]
    span = weight.float().abs().amax() * 2
    assert (layer.dequantized_weight() - weight.float()).abs().max() <= span * steps


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leading", [(0,), (1,), (2, 3), (16,), (WIDENED_MIN_ROWS + 3,)])
def test_w8a8_layer_holds_int8_weights_and_quantizes_its_input_rows(
    bias: bool, leading: tuple[int, ...]
) -> None:
    library = w8a8_library()
    if library is None:
        pytest.skip("no AVX512-VNNI here: w8a8 runs as int8")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 192, generator=generator).bfloat16()  # 40: not a multiple of 16
    b = torch.randn(40, generator=generator).bfloat16() if bias else None
    layer = W8A8Linear(weight, b, library)
    int8 = Int8Linear(weight, b)
    assert layer.group == 64  # 128 does not divide 192
    assert torch.equal(layer.int8_weight(), int8.weight)
    assert torch.equal(layer.dequantized_weight(), int8.dequantized_weight())
    x = torch.randn(*leading, 192, generator=generator).bfloat16()
    out = layer(x)
    assert out.shape == (*leading, 40) and out.dtype == torch.bfloat16
    q, scales = quantized_rows(x.reshape(-1, 192), 64)
    rows = (q.reshape(-1, 3, 64) * scales[..., None]).reshape(*leading, 192)
    dequantized = layer.dequantized_weight()
    reference = rows @ dequantized.T + (b.float() if b is not None else 0.0)
    magnitude = rows.abs() @ dequantized.abs().T + (b.float().abs() if b is not None else 0.0)
    assert ((out.float() - reference).abs() <= 2**-7 * magnitude).all()


def test_w8a8_falls_back_to_int8_where_it_cannot_run() -> None:
    odd = torch.randn(16, 50).bfloat16()  # no group size divides 50 inputs
    assert type(quantize_weight("w8a8", odd, None)) is Int8Linear
    native.use_native(False)
    try:
        assert type(quantize_weight("w8a8", torch.randn(16, 64).bfloat16(), None)) is Int8Linear
    finally:
        native.use_native(True)


def test_int4_skips_shapes_the_kernel_cannot_take() -> None:
    layer = nn.Linear(32, 8, bias=False)  # 8 output rows: the int4 pack needs multiples of 16
    assert quantize_weight("int4", layer.weight, None) is None
    assert isinstance(quantize_weight("int8", layer.weight, None), Int8Linear)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4"])
def test_quantized_model_logprobs_stay_close_to_bf16(
    arch: str, quantization: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    path = tiny_model_dir(arch)
    reference = prompt_logprobs(tiny_llm(path, "none"))
    llm = tiny_llm(path, quantization)
    model = llm.engine.runner.model
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    kinds = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear}
    assert isinstance(model.lm_head, kinds[quantization])
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # the lookup keeps full precision
    if quantization != "int4":  # int4 projections have no native path
        assert llm.engine.runner.num_native_layers == len(model.layers)
    ours = prompt_logprobs(llm)
    assert (ours - reference).abs().max() <= LOGPROB_TOLERANCE[quantization]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (output,) = llm.generate([PROMPT], greedy)
    assert len(output.outputs[0].token_ids) == 8


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int4_head_quantizes_the_output_projection_only(
    arch: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    path = tiny_model_dir(arch)
    reference = prompt_logprobs(tiny_llm(path, "none"))
    llm = tiny_llm(path, "int4-head")
    model = llm.engine.runner.model
    # The decoder projections stay bf16, plain, as the native decode layers read them: none
    # is quantized (nor packed for oneDNN).
    assert llm.engine.runner.num_native_layers == len(model.layers)
    projections = [m for m in model.layers.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * len(model.layers)
    assert all(m.weight.dtype == torch.bfloat16 for m in projections)
    assert not any(
        isinstance(m, (Int4Linear, Int8Linear, PackedLinear)) for m in model.layers.modules()
    )
    assert isinstance(model.lm_head, Int4Linear)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert (prompt_logprobs(llm) - reference).abs().max() <= LOGPROB_TOLERANCE["int4"]


def test_unknown_quantization_is_rejected(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_model_dir("llama")), quantization="bogus")


def test_an_int8_engine_builds_its_widened_prefill_matmuls_at_start(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    llm = LLM(
        str(tiny_model_dir("llama")),
        dtype="bfloat16",
        quantization="int8",
        num_blocks=64,
        max_num_batched_tokens=512,
    )
    model = llm.engine.runner.model
    shapes = {m.shape_key() for m in model.layers.modules() if isinstance(m, Int8Linear)}
    # Chunks of 256, 320, 384, 448, 512 and 576 rows (a step may run 16 tokens past its 512
    # to finish a prompt) take the widened bf16 matmul: one layer of each shape runs them;
    # nothing else in an int8 model builds oneDNN primitives.
    assert len(shapes) >= 3
    assert llm.engine.runner.num_warm_up_matmuls == 6 * len(shapes)
