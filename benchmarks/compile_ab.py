"""What `--compile` buys: eager and compiled decoder layers on one loaded engine, alternated.

  .venv/bin/python benchmarks/compile_ab.py [--quantization none|int8|int4|int4-head]
      [--concurrency 1 --concurrency 16] [--max-tokens 64] [--repeats 5]

The compiled functions are a process-wide switch (`models.fused.use_compiled`), so one
process can run the same engine both ways: each repeat runs eager then compiled back to
back at each concurrency, which cancels most of this machine's drift; the table gives the
median tokens/s of each and the median of the per-repeat ratios.
"""

import argparse
import statistics
import sys

from enduro.bench.offline import time_enduro, workload
from enduro.engine.llm import LLM
from enduro.models import fused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    levels = args.concurrency or [1, 16]
    llm = LLM(None, quantization=args.quantization, max_num_seqs=max(levels), compile=True)
    for compiled in (False, True):  # compile the one-token and dynamic graphs up front
        fused.use_compiled(compiled)
        for count in (1, 2):
            time_enduro(llm, workload(count), 4)
    results: dict[tuple[int, bool], list[float]] = {}
    for repeat in range(args.repeats):
        for count in levels:
            for compiled in (False, True):
                fused.use_compiled(compiled)
                tps = time_enduro(llm, workload(count), args.max_tokens)
                results.setdefault((count, compiled), []).append(tps)
            print(f"repeat {repeat + 1}/{args.repeats}, concurrency {count}: done", flush=True)
    print(
        f"\nquantization {args.quantization}, {args.max_tokens} tokens per request, "
        f"{args.repeats} repeats; decode tokens/s (median)"
    )
    print("| concurrency | eager | compiled | compiled / eager (median of repeats) |")
    print("|---|---|---|---|")
    for count in levels:
        eager, compiled = results[(count, False)], results[(count, True)]
        ratio = statistics.median(c / e for c, e in zip(compiled, eager, strict=True))
        print(
            f"| {count} | {statistics.median(eager):.1f} | {statistics.median(compiled):.1f} "
            f"| {ratio:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
