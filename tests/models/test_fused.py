"""The compiled elementwise stretches (`--compile`) against their eager versions, and a
compiled tiny model against transformers."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from enduro import SamplingParams, native
from enduro.models import fused
from tests.engine.reference import hf_greedy
from tests.engine.test_llm import PROMPTS, tiny_llm

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, ROTARY_HALF = 64, 4, 2, 16, 6
# bf16 keeps 8 bits of mantissa; the compiled kernels round once where eager rounds after
# every op, so they may differ by a few units in the last place.
ATOL, RTOL = 0.04, 0.02


@pytest.fixture
def compiled_ops() -> Iterator[fused.FusedOps]:
    torch._dynamo.reset()
    counters.clear()
    fused.use_compiled(True)
    try:
        yield fused.ops
        assert dict(counters["graph_break"]) == {}  # each function compiled whole
    finally:
        fused.use_compiled(False)
        torch._dynamo.reset()  # the next test compiles from scratch, in its own mode


def inputs(num_tokens: int, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    angles = torch.rand(num_tokens, ROTARY_HALF, generator=g) * 6.3
    return {
        "x": rand(num_tokens, HIDDEN),
        "residual": rand(num_tokens, HIDDEN),
        "weight": rand(HIDDEN),
        "next_weight": rand(HIDDEN),
        "qkv": rand(num_tokens, q_size + 2 * kv_size),
        "sizes": (q_size, kv_size, kv_size),
        "cos": angles.cos(),
        "sin": angles.sin(),
        "head_weight": rand(HEAD_DIM),
        "head_dim": HEAD_DIM,
        "gate_up": rand(num_tokens, 2 * HIDDEN),
    }


def calls(a: dict[str, Any]) -> dict[str, Callable[[fused.FusedOps], Any]]:
    """Each fused function on the inputs `a`, in every variant the models use."""
    return {
        "rms_norm": lambda ops: ops.rms_norm(a["x"], a["weight"], 1e-6, False),
        "rms_norm unit offset": lambda ops: ops.rms_norm(a["x"], a["weight"], 1e-6, True),
        "add_rms_norm": lambda ops: ops.add_rms_norm(
            a["residual"], a["x"], a["weight"], 1e-5, False
        ),
        "add_normed": lambda ops: ops.add_normed(a["residual"], a["x"], a["weight"], 1e-6, True),
        "add_normed_then_norm": lambda ops: ops.add_normed_then_norm(
            a["residual"], a["x"], a["weight"], a["next_weight"], 1e-6, True
        ),
        "qk_norm_rotary neox": lambda ops: ops.qk_norm_rotary(
            a["qkv"], a["sizes"], a["head_dim"], a["cos"], a["sin"], None, None, 1e-6, False, False
        ),
        "qk_norm_rotary normed interleaved": lambda ops: ops.qk_norm_rotary(
            a["qkv"],
            a["sizes"],
            a["head_dim"],
            a["cos"],
            a["sin"],
            a["head_weight"],
            a["head_weight"],
            1e-6,
            True,
            True,
        ),
        "act_and_mul gelu": lambda ops: ops.act_and_mul(a["gate_up"], "gelu_pytorch_tanh"),
        "act_and_mul silu": lambda ops: ops.act_and_mul(a["gate_up"], "silu"),
    }


def as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


@torch.inference_mode()  # as the engine runs them
def test_compiled_functions_match_eager(compiled_ops: fused.FusedOps) -> None:
    # bf16, the default model's dtype; float32 is covered by the compiled models below.
    dtype = torch.bfloat16
    assert compiled_ops.compiled and not fused.EAGER.compiled
    # One token (the one-stream decode step, which dynamo specialises), then varying counts
    # that share one dynamic graph.
    for seed, num_tokens in enumerate((1, 2, 5, 9)):
        a = inputs(num_tokens, dtype, seed)
        for name, call in calls(a).items():
            expected, got = as_tuple(call(fused.EAGER)), as_tuple(call(compiled_ops))
            assert len(got) == len(expected), name
            for e, g in zip(expected, got, strict=True):
                assert g.dtype == e.dtype and g.shape == e.shape, name
                torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("dims", [(HIDDEN, HEAD_DIM), (640, 256), (70, 24)])
def test_native_norms_equal_eager_bit_for_bit(dims: tuple[int, int]) -> None:
    # The default model's widths run the vector path; 70 and 24 (not multiples of 16) the
    # scalar one. Same arithmetic and rounding points: equal, not merely close.
    hidden, head_dim = dims
    library = native.load()
    assert library is not None
    native_ops = fused.FusedOps(compiled=False, native_ops=fused.NativeOps(library))
    for seed, num_tokens in enumerate((1, 3, 16)):
        g = torch.Generator().manual_seed(seed)
        a = inputs(num_tokens, torch.bfloat16, seed)
        a["x"] = (torch.randn(num_tokens, hidden, generator=g) * 4).bfloat16()
        a["residual"] = torch.randn(num_tokens, hidden, generator=g).bfloat16()
        a["weight"], a["next_weight"] = torch.randn(2, hidden, generator=g).bfloat16()
        q_size, kv_size = HEADS * head_dim, KV_HEADS * head_dim
        a["qkv"] = torch.randn(num_tokens, q_size + 2 * kv_size, generator=g).bfloat16()
        a["sizes"] = (q_size, kv_size, kv_size)
        a["head_weight"] = torch.randn(head_dim, generator=g).bfloat16()
        a["head_dim"] = head_dim
        for name, call in calls(a).items():
            if name.startswith("act_and_mul"):
                continue  # another formula: test_native_gated_activation_is_within_one_step
            expected, got = as_tuple(call(fused.EAGER)), as_tuple(call(native_ops))
            for e, n in zip(expected, got, strict=True):
                assert n.dtype == e.dtype and n.shape == e.shape, name
                assert torch.equal(n, e), name
    # float32 is left to the eager functions.
    x = torch.randn(2, hidden)
    weight = torch.randn(hidden)
    assert torch.equal(
        native_ops.rms_norm(x, weight, 1e-6, True), fused.rms_norm(x, weight, 1e-6, True)
    )


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("inter", [2048, 40])  # the default model's; not a multiple of 16
def test_native_gated_activation_is_within_one_step(act: str, inter: int) -> None:
    library = native.load()
    assert library is not None
    native_ops = fused.NativeOps(library)
    for seed, num_tokens in enumerate((1, 16, 144, 512)):
        g = torch.Generator().manual_seed(seed)
        gate_up = (torch.randn(num_tokens, 2 * inter, generator=g) * 3).bfloat16()
        expected = fused.act_and_mul(gate_up, act)
        got = native_ops.act_and_mul(gate_up, act)
        assert got.dtype == expected.dtype and got.shape == expected.shape == (num_tokens, inter)
        # The activation rounds to bf16, then the product does: each may land one bf16 step
        # (2^-8 relative) from torch's. Far in gelu's negative tail, where the output is
        # below 1e-5, torch's 0.5 g (1 + tanh y) loses digits to cancellation that the
        # kernel's g e^2y / (1 + e^2y) keeps, so there the two differ by more steps.
        step = 2**-7 * expected.float().abs().clamp(min=2**-10)
        assert ((got.float() - expected.float()).abs() <= step).all()
    # Other activations, and float32, are left to torch.
    gate_up = torch.randn(2, 80).bfloat16()
    assert torch.equal(native_ops.act_and_mul(gate_up, "gelu"), fused.act_and_mul(gate_up, "gelu"))
    x = torch.randn(2, 80)
    assert torch.equal(native_ops.act_and_mul(x, act), fused.act_and_mul(x, act))


def test_the_engine_runs_native_norms_unless_compiled_or_switched_off() -> None:
    library = native.load()
    fused.use_compiled(False, library)
    assert isinstance(fused.ops.rms_norm.__self__, fused.NativeOps)
    assert isinstance(fused.ops.act_and_mul.__self__, fused.NativeOps)
    fused.use_compiled(False, None)
    assert fused.ops is fused.EAGER


def test_the_switch_is_process_wide_and_builds_the_compiled_set_once() -> None:
    fused.use_compiled(False)
    assert fused.ops is fused.EAGER
    fused.use_compiled(True)
    first = fused.ops
    fused.use_compiled(False)
    assert fused.ops is fused.EAGER
    fused.use_compiled(True)
    assert fused.ops is first and first.compiled
    fused.use_compiled(False)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_a_compiled_model_matches_transformers(
    arch: str, tiny_model_dir: Callable[[str], Path], compiled_ops: fused.FusedOps
) -> None:
    # gemma3: sandwich norms, per-head q/k norms, unit-offset norms, gelu; llama: pre-norm,
    # silu. Several prompts prefilled together then decoded together: token counts 1 to 64.
    path = tiny_model_dir(arch)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = tiny_llm(path, max_num_batched_tokens=64, compile=True)
    assert fused.ops is compiled_ops
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, _ = hf_greedy(reference, prompt, 12)
        assert output.outputs[0].token_ids == tokens
