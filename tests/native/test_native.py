"""The native decode attention against torch's path, and how the library is built and found."""

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from enduro import native
from enduro.models.attention import paged_attention
from enduro.runner.attention_inputs import build_attention_metadata

BLOCK_SIZE = 16


@pytest.fixture(autouse=True)
def native_on() -> Iterator[None]:
    native.use_native(True)
    yield
    native.use_native(True)


def attend(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    use_native: bool,
    query_lens: list[int] | None = None,
) -> torch.Tensor:
    """One step's attention over random caches, blocks in a shuffled order: a decode step,
    or the last `query_lens[r]` tokens of each request."""
    query_lens = query_lens or [1] * len(seq_lens)
    generator = torch.Generator().manual_seed(0)
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in seq_lens) + 3
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).bfloat16()
    v_cache = torch.randn(shape, generator=generator).bfloat16()
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for n in seq_lens:
        count = -(-n // BLOCK_SIZE)
        tables.append(order[:count])
        order = order[count:]
    attn, _ = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, [window])
    rows = sum(query_lens)
    q = torch.randn(rows, num_heads, head_dim, generator=generator).bfloat16()
    k = torch.randn(rows, num_kv_heads, head_dim, generator=generator).bfloat16()
    v = torch.randn(rows, num_kv_heads, head_dim, generator=generator).bfloat16()
    native.use_native(use_native)
    return paged_attention(q, k, v, (k_cache, v_cache), attn, window, head_dim**-0.5)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    # Gemma 3 270M; GQA; MHA and head dims the vector path does not take (80, 24); six query
    # heads a KV head and a dim of 96 (its last 32 dims a short block, the group 4 + 2)
    [(4, 1, 256), (8, 2, 64), (4, 4, 80), (6, 3, 24), (12, 2, 96)],
)
@pytest.mark.parametrize("window", [None, 20])
def test_decode_attention_matches_torch(
    num_heads: int, num_kv_heads: int, head_dim: int, window: int | None
) -> None:
    assert native.load() is not None
    # One key, a partial block, whole blocks, a context past the window.
    seq_lens = [1, 7, 16, 33, 100]
    expected = attend(seq_lens, num_heads, num_kv_heads, head_dim, window, use_native=False)
    out = attend(seq_lens, num_heads, num_kv_heads, head_dim, window, use_native=True)
    assert out.shape == expected.shape == (5, num_heads * head_dim)
    assert out.dtype == torch.bfloat16
    # Both sum in float32 in another order and round once to bf16: within one bf16 step
    # (2^-8 relative) of the larger output; measured at most one step.
    tolerance = 2**-7 * expected.float().abs().clamp(min=1.0)
    assert ((out.float() - expected.float()).abs() <= tolerance).all()


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    # Gemma 3 270M; GQA; MHA; a head dim the vector path does not take (the scalar one does)
    [(4, 1, 256), (8, 2, 64), (4, 4, 80), (6, 3, 24)],
)
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize(
    ("query_lens", "seq_lens"),
    [
        # whole prompts, a chunk after a cached prefix, one past the window, a short one
        ([5, 17, 40, 3], [5, 30, 100, 3]),
        # beside decode requests (the step attends in two parts)
        ([1, 33, 1], [9, 33, 70]),
    ],
)
def test_prefill_attention_matches_torch(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    query_lens: list[int],
    seq_lens: list[int],
) -> None:
    assert native.load() is not None
    args = (seq_lens, num_heads, num_kv_heads, head_dim, window)
    expected = attend(*args, use_native=False, query_lens=query_lens)
    out = attend(*args, use_native=True, query_lens=query_lens)
    assert out.shape == expected.shape == (sum(query_lens), num_heads * head_dim)
    assert out.dtype == torch.bfloat16
    tolerance = 2**-7 * expected.float().abs().clamp(min=1.0)
    assert ((out.float() - expected.float()).abs() <= tolerance).all()


def test_a_window_hides_every_key_before_it() -> None:
    # Changing the values outside a request's window must not change its output.
    generator = torch.Generator().manual_seed(1)
    k_cache = torch.randn(4, BLOCK_SIZE, 1, 32, generator=generator).bfloat16()
    v_cache = torch.randn(4, BLOCK_SIZE, 1, 32, generator=generator).bfloat16()
    attn, _ = build_attention_metadata([1], [40], [[2, 0, 3]], BLOCK_SIZE, [10])
    q = torch.randn(1, 2, 32, generator=generator).bfloat16()
    k, v = k_cache[3, 7:8].clone(), v_cache[3, 7:8].clone()  # position 39 writes itself back
    out = paged_attention(q, k, v, (k_cache, v_cache), attn, 10, 0.2)
    v_cache[2] = 1000.0  # positions 0..15
    v_cache[0, :14] = -1000.0  # positions 16..29; the window starts at 30
    assert torch.equal(paged_attention(q, k, v, (k_cache, v_cache), attn, 10, 0.2), out)


# A fresh process (load() is cached per process) with its own cache directory.
BUILD = textwrap.dedent("""
    import json, sys, time
    from enduro import native
    started = time.monotonic()
    library = native.load()
    print(json.dumps({"built": library is not None, "seconds": time.monotonic() - started,
                      "path": str(library.path) if library else None}))
""")


def run_build(cache_dir: Path, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", BUILD],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ENDURO_CACHE_DIR": str(cache_dir), **env},
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_the_library_is_built_once_into_the_cache_and_reused(tmp_path: Path) -> None:
    first = run_build(tmp_path)
    assert first["built"] is True
    path = Path(str(first["path"]))
    assert path.parent == tmp_path / "native" and path.suffix == ".so"
    built_at = path.stat().st_mtime_ns
    second = run_build(tmp_path)
    assert second["path"] == first["path"] and path.stat().st_mtime_ns == built_at
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no leftovers


def test_without_a_compiler_attention_falls_back_to_torch(tmp_path: Path) -> None:
    result = run_build(tmp_path, CC=str(tmp_path / "no-such-compiler"))
    assert result["built"] is False
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())


def test_switched_off_load_returns_none() -> None:
    native.use_native(False)
    assert native.load() is None


@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    # Decode sizes of the default model's projections; tails of the 4-row blocks of x and of
    # the weight; an input width off the 32-wide vector path (scalar loop).
    [(1, 1536, 640), (16, 640, 2048), (5, 643, 96), (3, 10, 50), (33, 8, 64)],
)
def test_linear_int8_matches_float_matmul(rows: int, out_features: int, in_features: int) -> None:
    library = native.load()
    assert library is not None
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-128, 128, (out_features, in_features), generator=generator).to(torch.int8)
    scales = (torch.rand(out_features, generator=generator) / 64).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    out = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)
    library.linear_int8(
        x.data_ptr(),
        rows,
        in_features,
        q.data_ptr(),
        scales.data_ptr(),
        out_features,
        out.data_ptr(),
    )
    weight = q.float() * scales.float()[:, None]
    reference = x.float() @ weight.T
    # Exact products summed in float32, then one bf16 rounding of the output: within an
    # output ulp plus the float32 sum's error (a few ulps of sum |x * w|).
    bound = 2**-8 * reference.abs() + 2**-20 * (x.float().abs() @ weight.abs().T)
    assert ((out.float() - reference).abs() <= bound).all()


def quantized_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_w8a8.c's activation quantization in torch: q = round(x * 127 / max|x|) per
    group of `group` inputs (ties to even), and the scales max|x| / 127, [M, K / group]."""
    rows, width = x.shape
    groups = x.float().reshape(rows, width // group, group)
    amax = groups.abs().amax(-1)
    # A tensor divided, not 127 / amax: torch computes that as amax.reciprocal() * 127, which
    # rounds twice.
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse[..., None])
    return q.reshape(rows, width), amax / 127


def packed_w8a8(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 → linear_w8a8.c's layout: q + 128, [N / 16, K / 4, 16, 4], N padded."""
    rows, width = q.shape
    padded = torch.full((-(-rows // 16) * 16, width), 128, dtype=torch.uint8)
    padded[:rows] = (q.to(torch.int16) + 128).to(torch.uint8)
    return padded.view(-1, 16, width // 4, 4).permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize(
    ("rows", "out_features", "in_features", "group"),
    # Decode sizes of the default model's projections (8-row tiles, and their tails); an
    # output count off the 16-wide blocks; one scale per row; a prefill-sized chunk.
    [
        (1, 1536, 640, 128),
        (16, 640, 2048, 128),
        (11, 40, 96, 32),
        (3, 16, 64, 64),
        (70, 48, 128, 128),
    ],
)
def test_linear_w8a8_matches_integer_products(
    rows: int, out_features: int, in_features: int, group: int
) -> None:
    library = native.load()
    assert library is not None
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (out_features, in_features), generator=generator).to(torch.int8)
    scales = torch.zeros(-(-out_features // 16) * 16)
    scales[:out_features] = torch.rand(out_features, generator=generator) / 64
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    x[0, :group] = 0  # a group of zeros has scale 0, not a division by it
    packed = packed_w8a8(q)
    outputs = []
    for linear in (library.linear_w8a8, library.linear_w8a8_scalar):
        out = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)
        status = linear(
            x.data_ptr(),
            rows,
            in_features,
            packed.data_ptr(),
            scales.data_ptr(),
            group,
            out_features,
            out.data_ptr(),
        )
        assert status == 0
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])  # the same sums in the same order
    xq, x_scales = quantized_rows(x, group)
    # Integer products are exact in float64; each group's sum is scaled by its row's scale.
    per_group = torch.einsum(
        "mgk,ngk->mng",
        xq.double().reshape(rows, -1, group),
        q.double().reshape(out_features, -1, group),
    )
    scaled = per_group * x_scales.double()[:, None, :]
    reference = scaled.sum(-1) * scales[:out_features].double()
    magnitude = scaled.abs().sum(-1) * scales[:out_features].double()
    # float32 sums over the groups, then one bf16 rounding of the output
    bound = 2**-8 * reference.abs() + 2**-20 * magnitude
    assert ((outputs[0].double() - reference).abs() <= bound).all()


def test_w8a8_activations_quantize_as_torch_rounds() -> None:
    library = native.load()
    assert library is not None
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 256, generator=generator) * 3).bfloat16()
    x[1, 64:128] = 0
    # Ties: with max|x| = 127, x * 127 / max|x| is x, and k + 0.5 rounds to the even side.
    x[2, :16] = 0.5
    x[2, 16] = 127
    x[2, 17:64] = torch.tensor([k + 0.5 for k in range(-23, 24)])
    q = torch.empty(5, 256, dtype=torch.int8)
    scales = torch.empty(5, 4)
    corrections = torch.empty(5, 4, dtype=torch.int32)
    library.quantize_rows(
        x.data_ptr(), 5, 256, 64, q.data_ptr(), scales.data_ptr(), corrections.data_ptr()
    )
    expected_q, expected_scales = quantized_rows(x, 64)
    assert torch.equal(q.float(), expected_q)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(corrections, -128 * q.int().reshape(5, 4, 64).sum(-1))
    assert scales[1, 1] == 0 and (q[1, 64:128] == 0).all()
    assert q[2, :17].tolist() == [0] * 16 + [127]
    assert q[2, 17 + 23 : 17 + 27].tolist() == [0, 2, 2, 4]  # 0.5, 1.5, 2.5, 3.5
