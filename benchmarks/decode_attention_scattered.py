"""Decode attention as an engine step meets it: 18 layers' KV caches (more than the CPU's
caches hold), each request's blocks scattered over the pool as continuous batching leaves
them, 16 requests of one new token.

  .venv/bin/python benchmarks/decode_attention_scattered.py [--context 192 1024]

Prints the median time of the 18 layers' attention (the native kernel, or torch's path with
--no-native) and the K/V bytes read per second.
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
LAYERS, REQUESTS = 18, 16


def eighteen_layers(context: int, repeats: int) -> float:
    """Median seconds of one step's attention over LAYERS layers."""
    blocks = -(-context // BLOCK_SIZE)
    pool = REQUESTS * blocks * 4  # a pool with room to spare, as a server's is
    generator = torch.Generator().manual_seed(0)
    shape = (pool, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    caches = [
        (
            torch.randn(shape, generator=generator).bfloat16(),
            torch.randn(shape, generator=generator).bfloat16(),
        )
        for _ in range(LAYERS)
    ]
    scattered = torch.randperm(pool, generator=generator).tolist()
    tables = [scattered[r * blocks : (r + 1) * blocks] for r in range(REQUESTS)]
    attn, _ = build_attention_metadata(
        [1] * REQUESTS, [context] * REQUESTS, tables, BLOCK_SIZE, [None]
    )
    q = torch.randn(REQUESTS, HEADS, HEAD_DIM, generator=generator).bfloat16()
    k = torch.randn(REQUESTS, KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for cache in caches:
                paged_attention(q, k, k, cache, attn, None, HEAD_DIM**-0.5)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, nargs="+", default=[192, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-native", action="store_true")
    args = parser.parse_args()
    native.use_native(not args.no_native)
    for context in args.context:
        seconds = eighteen_layers(context, args.repeats)
        kv_bytes = REQUESTS * context * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
        print(
            f"{REQUESTS} requests x {context} keys, {LAYERS} layers: {seconds * 1e3:.2f} ms "
            f"({kv_bytes / seconds / 1e9:.1f} GB/s of K and V)"
        )


if __name__ == "__main__":
    main()
