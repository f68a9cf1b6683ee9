"""What the native kernels buy: one engine, torch's ops and the C kernels alternated step by step.

  .venv/bin/python benchmarks/native_ab.py [--requests 16] [--prompt-tokens 140]
      [--steps 120] [--kernel norms|attention|both|layer] [--quantization none|int8]

Loads the default model (bf16), prefills `--requests` prompts of `--prompt-tokens` tokens
(the opening of the bundled Tom Sawyer text at different offsets), then runs `--steps` decode
steps, switching every step between torch's ops and the native kernel(s) (`--kernel`; with
`layer`, between the layer modules, native norms and attention included, and the whole
native decode layer; the others run without the native layer):
neighbouring steps see the same machine, batch and context lengths, so the median of the
per-pair ratios cancels the VM's drift, which moves whole minutes by ±30 % here. Sampling at
temperature 1, as the chat workload does.
"""

import argparse
import statistics
import sys
import time
from importlib import resources
from typing import Any

from enduro import native
from enduro.engine.llm import LLM
from enduro.models import fused
from enduro.sampling_params import SamplingParams

TEXT_FILE = "tom_sawyer.txt"


def switch(
    kernel: str, on: bool, native_ops: fused.FusedOps, layers: list[tuple[Any, Any]]
) -> None:
    for layer, native_decode in layers:
        layer.native_decode = native_decode if on and kernel == "layer" else None
    if kernel in ("attention", "both"):
        native.use_native(on)
    if kernel in ("norms", "both"):
        fused.ops = native_ops if on else fused.EAGER


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=140)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kernel", choices=("norms", "attention", "both", "layer"), default="both")
    parser.add_argument("--quantization", choices=("none", "int8"), default="none")
    args = parser.parse_args()
    llm = LLM(
        None,
        dtype="bfloat16",
        max_num_seqs=max(args.requests, 1),
        quantization=args.quantization,
    )
    if not llm.engine.runner.native_kernels:
        print("native kernels unavailable (no C compiler?)", file=sys.stderr)
        return 1
    layers = [(layer, layer.native_decode) for layer in llm.engine.runner.model.layers]
    assert llm.tokenizer is not None
    native_ops = fused.ops
    text = resources.files("enduro.bench").joinpath("data", TEXT_FILE).read_text()
    ids = llm.tokenizer.encode(text)
    needed = args.requests * (args.prompt_tokens + 100)
    if len(ids) < needed:
        ids = ids * (needed // len(ids) + 1)
    params = SamplingParams(max_tokens=args.steps + 8, temperature=1.0, ignore_eos=True)
    for r in range(args.requests):
        start = r * (args.prompt_tokens + 100)
        llm.add_request(ids[start : start + args.prompt_tokens], params)
    budget = llm.config.scheduler.max_num_batched_tokens
    for _ in range(-(-args.requests * args.prompt_tokens // budget) + 2):  # prefill, then one
        llm.step()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps):
        on = i % 2 == 1
        switch(args.kernel, on, native_ops, layers)
        started = time.perf_counter()
        llm.step()
        times[on].append(time.perf_counter() - started)
    switch(args.kernel, True, native_ops, layers)
    ratios = [b / a for a, b in zip(times[False], times[True], strict=True)]
    print(
        f"{args.requests} requests, {args.prompt_tokens}-token prompts, {args.steps} decode "
        f"steps, kernel {args.kernel}, bf16, quantization {args.quantization}"
    )
    print("| | median step | mean step |")
    print("|---|---|---|")
    for on, label in ((False, "torch"), (True, "native")):
        print(
            f"| {label} | {1000 * statistics.median(times[on]):.1f} ms "
            f"| {1000 * statistics.mean(times[on]):.1f} ms |"
        )
    print(f"median per-pair step ratio native / torch: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
