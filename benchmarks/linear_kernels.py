"""The projection kernels a decode step can run, side by side on the default model's shapes.

  .venv/bin/python benchmarks/linear_kernels.py [--rows 1 4 16] [--repeats 11]

Times, at each row count, the 72 decoder projections of Gemma 3 270M (18 layers of q|k|v
640→1536, o 1024→640, gate|up 640→4096, down 2048→640; a distinct random weight each, so
nothing stays in cache) and its 640→262,144 output projection, with: enduro's native kernel
on int8 weights (`native/linear.c`), torch's int8 kernel (`_weight_int8pack_mm`), oneDNN on
bf16 weights reordered once (`PackedLinear`), and enduro's native kernel on plain bf16
weights (the native decode layer's projections in an unquantized model). Prints the median
of `--repeats` runs per cell, all kernels alternated within each repeat.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from enduro import native

LAYERS = 18
DECODER_SHAPES = [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]  # (out, in)
HEAD_SHAPE = (262_144, 640)

Kernel = Callable[[torch.Tensor], torch.Tensor]


def kernels(library: native.Library, out_features: int, in_features: int) -> dict[str, Kernel]:
    """The four kernels on one random [out, in] weight."""
    weight = torch.randn(out_features, in_features).bfloat16()
    q = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)
    scales = (torch.rand(out_features) / 100).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def native_int8(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], out_features)
        library.linear_int8(
            x.data_ptr(), x.shape[0], in_features, q.data_ptr(), scales.data_ptr(),
            out_features, out.data_ptr(),
        )  # fmt: skip
        return out

    def native_bf16(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], out_features)
        library.linear_bf16(
            x.data_ptr(), x.shape[0], in_features, weight.data_ptr(), out_features, out.data_ptr()
        )
        return out

    return {
        "native int8": native_int8,
        "torch int8": lambda x: torch._weight_int8pack_mm(x, q, scales),
        "oneDNN bf16 (packed)": lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        ),
        "native bf16": native_bf16,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    library = native.load()
    if library is None:
        print("native kernels unavailable (no C compiler?)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    decoder = [
        (shape[1], kernels(library, *shape)) for _ in range(LAYERS) for shape in DECODER_SHAPES
    ]
    head = kernels(library, *HEAD_SHAPE)
    names = list(head)
    print("| rows | what | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k).bfloat16() for k in {s[1] for s in DECODER_SHAPES}}
        head_input = torch.randn(rows, HEAD_SHAPE[1]).bfloat16()
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name in names:
                started = time.perf_counter()
                for in_features, layer in decoder:
                    layer[name](inputs[in_features])
                times.setdefault(("72 decoder projections", name), []).append(
                    time.perf_counter() - started
                )
                started = time.perf_counter()
                head[name](head_input)
                times.setdefault(("output projection", name), []).append(
                    time.perf_counter() - started
                )
        for what in ("72 decoder projections", "output projection"):
            cells = [f"{1000 * statistics.median(times[what, name]):.2f} ms" for name in names]
            print(f"| {rows} | {what} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
