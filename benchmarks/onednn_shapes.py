"""Process memory of a bf16 640 -> 2048 CPU matmul run at every row count from 1 to 1200:
plain torch.nn.Linear (oneDNN caches a primitive per input shape) next to enduro's Linear
(rows padded up to ~30 buckets). Usage: .venv/bin/python benchmarks/onednn_shapes.py"""

import torch

from enduro.models.layers import Linear
from enduro.observability.process_memory import anon_memory_bytes

MIB = 1 << 20


def grow(layer: torch.nn.Module) -> list[int]:
    readings = []
    with torch.inference_mode():
        for rows in range(1, 1201):
            layer(torch.randn(rows, 640, dtype=torch.bfloat16))
            if rows % 300 == 0:
                readings.append((anon_memory_bytes() or 0) // MIB)
    return readings


if __name__ == "__main__":
    torch.manual_seed(0)
    start = (anon_memory_bytes() or 0) // MIB
    bucketed = grow(Linear(640, 2048, bias=False).to(torch.bfloat16))
    plain = grow(torch.nn.Linear(640, 2048, bias=False).to(torch.bfloat16))
    print(f"start {start} MiB")
    print("rows      " + "  ".join(f"{r:>6}" for r in (300, 600, 900, 1200)))
    print("bucketed  " + "  ".join(f"{m:>6}" for m in bucketed))
    print("plain     " + "  ".join(f"{m:>6}" for m in plain))
