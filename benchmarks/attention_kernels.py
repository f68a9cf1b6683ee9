"""Paged attention of the default model's shapes (4 query heads of 256 sharing one KV head),
native kernels against torch's path (gathered blocks, scaled_dot_product_attention).

  .venv/bin/python benchmarks/attention_kernels.py [--repeats 20]

Prompt chunks (`prefill`: a 512- and a 128-token prompt, and a 512-token chunk after 1,536
cached tokens) and decode steps (`decode`: 16 or 8 requests of 256 or 2,048 keys, one of
4,096), each with full attention and Gemma 3's 512-token window. Prints the median time of
one layer's attention per cell.
"""

import argparse
import statistics
import time

import torch

from enduro import native
from enduro.models.attention import paged_attention
from enduro.runner.attention_inputs import build_attention_metadata

BLOCK_SIZE = 16
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 256

# (name, requests, new tokens per request, context per request after the step)
CASES = [
    ("prefill", 1, 512, 512),
    ("prefill", 1, 128, 128),
    ("prefill", 1, 512, 2048),
    ("decode", 16, 1, 256),
    ("decode", 16, 1, 2048),
    ("decode", 8, 1, 2048),
    ("decode", 1, 1, 4096),
]


def time_case(requests: int, new: int, context: int, window: int | None, repeats: int) -> str:
    blocks = -(-context // BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    shape = (requests * blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=generator).bfloat16()
    v_cache = torch.randn(shape, generator=generator).bfloat16()
    tables = [list(range(r * blocks, (r + 1) * blocks)) for r in range(requests)]
    attn, _ = build_attention_metadata(
        [new] * requests, [context] * requests, tables, BLOCK_SIZE, [window]
    )
    q = torch.randn(requests * new, HEADS, HEAD_DIM, generator=generator).bfloat16()
    k = torch.randn(requests * new, KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
    cells = []
    for use_native in (False, True):
        native.use_native(use_native)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first builds what the rest reuse
                start = time.perf_counter()
                paged_attention(q, k, k, (k_cache, v_cache), attn, window, HEAD_DIM**-0.5)
                times.append(time.perf_counter() - start)
        cells.append(statistics.median(times[1:]) * 1e3)
    native.use_native(True)
    torch_ms, native_ms = cells
    return f"{torch_ms:.2f} ms | {native_ms:.2f} ms | {torch_ms / native_ms:.1f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if native.load() is None:
        raise SystemExit("native kernels unavailable: nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | requests × new tokens, context | window | torch | native | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, requests, new, context in CASES:
        for window in (None, 512):
            cell = time_case(requests, new, context, window, args.repeats)
            print(f"| {name} | {requests} × {new}, {context} | {window or '-'} | {cell} |")


if __name__ == "__main__":
    main()
