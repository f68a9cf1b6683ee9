"""Does CPU attention keep memory per shape? Process memory while bf16
`scaled_dot_product_attention` (the call `models/attention.py` makes, boolean mask, GQA)
sees many query lengths and key lengths, as continuous batching produces them.

  .venv/bin/python benchmarks/sdpa_shapes.py [--calls 1500]

Runs the same number of calls three times in one process: query and key lengths drawn
freely (query 1..512, keys a multiple of 16 up to 4,096), then the query length padded to
`models.layers.row_bucket`, then both fixed; prints RssAnon + VmSwap after each phase, and
what malloc's callers hold against what malloc keeps (`process_memory.malloc_stats`).
"""

import argparse
import random
import sys

import torch
import torch.nn.functional as F

from enduro.models.layers import row_bucket
from enduro.observability.process_memory import anon_memory_bytes, malloc_stats

MIB = 1 << 20
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 256  # Gemma 3 270M


def attend(query_len: int, key_len: int) -> None:
    q = torch.randn(2, HEADS, query_len, HEAD_DIM, dtype=torch.bfloat16)
    k = torch.randn(2, KV_HEADS, key_len, HEAD_DIM, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(2, 1, query_len, key_len, dtype=torch.bool).tril(key_len - query_len)
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _malloc() -> str:
    """What malloc's callers hold and what malloc keeps besides (live vs retained)."""
    stats = malloc_stats()
    if stats is None:
        return "unreadable"
    return (
        f"{stats.allocator} allocated {stats.allocated_bytes / MIB:.0f} MiB, "
        f"held {stats.held_bytes / MIB:.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    shapes = [(rng.randint(1, 512), 16 * rng.randint(32, 256)) for _ in range(args.calls)]
    phases = {
        "free query and key lengths": shapes,
        "query length bucketed": [(row_bucket(q), s) for q, s in shapes],
        "both fixed": [(512, 4096)] * args.calls,
    }
    print(f"start: {(anon_memory_bytes() or 0) / MIB:.0f} MiB; malloc: {_malloc()}")
    with torch.inference_mode():
        for name, phase in phases.items():
            before = anon_memory_bytes() or 0
            for query_len, key_len in phase:
                attend(query_len, key_len)
            after = anon_memory_bytes() or 0
            print(f"{name}: {len(set(phase))} shapes, {before / MIB:.0f} → {after / MIB:.0f} MiB")
            print(f"  malloc: {_malloc()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
