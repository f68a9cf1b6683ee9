import torch

from enduro.models.layers import Linear, row_bucket


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
