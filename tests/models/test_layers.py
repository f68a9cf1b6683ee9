import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from enduro import LLM, native
from enduro.models.layers import (
    Linear,
    PackedLinear,
    pack_weight,
    row_bucket,
    row_buckets,
    warm_up_matmuls,
)


def test_row_buckets_are_exact_for_decode_and_few_above() -> None:
    assert [row_bucket(n) for n in (1, 7, 16, 17, 32, 33, 128, 129, 512, 520)] == [
        1,
        7,
        16,
        32,
        32,
        48,
        128,
        192,
        512,
        576,
    ]
    assert len({row_bucket(n) for n in range(1, 529)}) == 16 + 7 + 7


def test_bucketed_rows_give_the_rows_of_an_unpadded_matmul() -> None:
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(37, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    out = layer(x)
    assert out.shape == (37, 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    # fp32 is left alone (MKL, not oneDNN): bit for bit the plain matmul.
    layer32 = Linear(64, 96, bias=True)
    x32 = torch.randn(37, 64)
    assert torch.equal(layer32(x32), torch.nn.functional.linear(x32, layer32.weight, layer32.bias))


def test_row_buckets_lists_each_bucket_once() -> None:
    assert row_buckets(20) == [*range(1, 17), 32]
    assert row_buckets(512)[-8:] == [112, 128, 192, 256, 320, 384, 448, 512]
    assert len(row_buckets(512)) == 16 + 7 + 6


def test_warm_up_runs_each_half_precision_shape_once_per_bucket() -> None:
    a = torch.zeros(96, 64, dtype=torch.bfloat16)
    b = torch.ones(96, 64, dtype=torch.bfloat16)  # same shape: its primitives are a's
    c = torch.zeros(32, 64, dtype=torch.bfloat16)
    fp32 = torch.zeros(96, 64)  # fp32 goes through MKL, no primitive cache: skipped
    with_bias = (torch.zeros(96, 64, dtype=torch.bfloat16), torch.zeros(96, dtype=torch.bfloat16))
    weights = [(a, None), (b, None), (c, None), (fp32, None), with_bias]
    assert warm_up_matmuls(weights, 40) == 3 * len(row_buckets(40))


# Run in a fresh process: the primitive cache is process-wide, so other tests' matmuls would
# already have built some of these shapes. Each script prints (growth from the warm-up, growth
# from 300 random step sizes after it) in MiB; argv[1] is "warm" or "cold".
RSS_MIB = textwrap.dedent("""
    import random, sys, torch

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
""")


def rss_growth(script: str, mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_MIB + script, mode], capture_output=True, text=True, check=True
    )
    warm_up, traffic = out.stdout.split()
    return float(warm_up), float(traffic)


PRIMITIVES = textwrap.dedent("""
    from enduro.models.layers import bucketed_linear, warm_up_matmuls

    weight = torch.randn(2048, 640, dtype=torch.bfloat16)
    start = rss_mib()
    if sys.argv[1] == "warm":
        warm_up_matmuls([(weight, None)], 512)
    warmed = rss_mib()
    rng = random.Random(0)
    for _ in range(300):
        x = torch.zeros(rng.randint(1, 512), 640, dtype=torch.bfloat16)
        bucketed_linear(x, weight, None)
    print(warmed - start, rss_mib() - warmed)
""")


def test_after_the_warm_up_new_step_sizes_add_no_memory() -> None:
    cold_warm_up, cold_traffic = rss_growth(PRIMITIVES, "cold")
    warm_up, traffic = rss_growth(PRIMITIVES, "warm")
    # Measured: 29 primitives of this shape ≈ 22 MiB; 300 random step sizes grow a cold
    # process by ≈15 MiB and a warmed one by -2 to +2 MiB.
    assert abs(cold_warm_up) < 1 and warm_up > 12
    assert cold_traffic > 8 and traffic < 5


# Two packed layers of one shape: warming the first must build the second's primitives too,
# which is what lets `CausalLM.warm_up` run one layer of each shape.
PACKED_PRIMITIVES = textwrap.dedent("""
    from enduro.models.layers import PackedLinear

    warmed_layer, other = (
        PackedLinear(torch.randn(2048, 640, dtype=torch.bfloat16), None, 16) for _ in range(2)
    )
    start = rss_mib()
    if sys.argv[1] == "warm":
        warmed_layer.warm_up(512)
    warmed = rss_mib()
    rng = random.Random(0)
    for _ in range(300):
        other(torch.zeros(rng.randint(1, 512), 640, dtype=torch.bfloat16))
    print(warmed - start, rss_mib() - warmed)
""")


def test_warming_one_packed_layer_serves_every_layer_of_its_shape() -> None:
    cold_warm_up, cold_traffic = rss_growth(PACKED_PRIMITIVES, "cold")
    warm_up, traffic = rss_growth(PACKED_PRIMITIVES, "warm")
    # Measured: the warm-up adds ≈21 MiB; 300 random step sizes on the other layer then add
    # ≈4 MiB, against ≈15.5 MiB in a process that skipped it.
    assert abs(cold_warm_up) < 1 and warm_up > 12
    assert cold_traffic > 10 and traffic < 7


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_weight_gives_the_plain_matmul_bit_for_bit(bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 64, dtype=torch.bfloat16)
    bias_tensor = torch.randn(300, dtype=torch.bfloat16) if bias else None
    packed = pack_weight(weight, bias_tensor, 16)
    assert isinstance(packed, PackedLinear)
    for rows in (1, 5, 16, 37):  # 37 runs padded to its bucket, 48
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        out = packed(x)
        assert out.shape == (rows, 300)
        assert torch.equal(out, torch.nn.functional.linear(x, weight, bias_tensor))
    assert packed.warm_up(20) == len(row_buckets(20))


def test_float32_weights_are_not_packed() -> None:
    assert pack_weight(torch.zeros(300, 64), None, 16) is None


def test_the_engine_packs_every_projection_in_half_precision(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    path = tiny_model_dir("gemma3")
    llm = LLM(str(path), dtype="bfloat16", num_blocks=64)
    model = llm.engine.runner.model
    assert isinstance(model.lm_head, PackedLinear) and llm.engine.runner.packed_output_projection
    hidden = torch.randn(3, model.embed_tokens.weight.shape[1], dtype=torch.bfloat16)
    # A tied model: the packed head is the embedding matrix, which stays for the lookups.
    expected = torch.nn.functional.linear(hidden, model.embed_tokens.weight)
    assert torch.equal(model.lm_head(hidden), expected)
    assert not model.pack_output_projection(16)  # packed already
    # The decoder layers run decode steps natively, on their plain weights: none packed.
    assert llm.engine.runner.num_native_layers == len(model.layers)
    assert llm.engine.runner.num_packed_projections == 0
    # Without native kernels every decoder projection is (q|k|v, o, gate|up, down), in place
    # of its plain weight.
    try:
        torch_only = LLM(str(path), dtype="bfloat16", num_blocks=64, native_kernels=False)
    finally:
        native.use_native(True)  # the switch is process-wide
    model = torch_only.engine.runner.model
    projections = [m for m in model.layers.modules() if isinstance(m, PackedLinear)]
    assert torch_only.engine.runner.num_packed_projections == len(projections)
    assert len(projections) == 4 * len(model.layers)
    assert not any(isinstance(m, Linear) for m in model.layers.modules())
    fp32 = LLM(str(path), dtype="float32", num_blocks=64).engine.runner
    assert fp32.model.lm_head is None and not fp32.packed_output_projection
    assert fp32.num_packed_projections == 0
