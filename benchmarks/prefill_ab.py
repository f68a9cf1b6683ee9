"""512-token prefill: enduro's engine against transformers' forward on the same weights.

  .venv/bin/python benchmarks/prefill_ab.py [--prompt-tokens 512] [--repeats 5]
      [--quantization none|int8|w8a8|int4|int4-head]

Loads the default model once into enduro (bf16) and builds transformers' implementation on
the very tensors enduro loaded (`enduro.bench.offline.build_transformers_model`), then times,
alternating the two `--repeats` times, one prompt of `--prompt-tokens` tokens (the bundled
Tom Sawyer text, repeated, from a different offset each repeat, so enduro's prefix cache never
hits): enduro as `LLM.generate(max_tokens=1)` (prefill and one sampled token), transformers
as one forward over the prompt (its logits only). Prints the medians and their ratio.
"""

import argparse
import statistics
import sys
import time
from importlib import resources

import torch

from enduro.bench.offline import build_transformers_model
from enduro.config import QUANTIZATIONS
from enduro.engine.llm import LLM
from enduro.sampling_params import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    args = parser.parse_args()
    llm = LLM(None, dtype="bfloat16", quantization=args.quantization)
    assert llm.tokenizer is not None
    baseline = build_transformers_model(llm)
    text = resources.files("enduro.bench").joinpath("data", "tom_sawyer.txt").read_text()
    ids = llm.tokenizer.encode(text)
    ids = ids * (-(-(args.prompt_tokens + 7 * args.repeats) // len(ids)))  # a short text, repeated
    params = SamplingParams(max_tokens=1, temperature=0.0)
    times: dict[str, list[float]] = {"enduro": [], "transformers": []}
    for repeat in range(args.repeats + 1):  # the first round warms both up, untimed
        start = repeat * 7  # a new first block: no prefix to reuse
        prompt = ids[start : start + args.prompt_tokens]
        assert len(prompt) == args.prompt_tokens, "the text is too short for these repeats"
        started = time.perf_counter()
        llm.generate([prompt], params)
        enduro_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            baseline(torch.tensor([prompt]))
        transformers_seconds = time.perf_counter() - started
        if repeat > 0:
            times["enduro"].append(enduro_seconds)
            times["transformers"].append(transformers_seconds)
    print(
        f"{args.prompt_tokens}-token prefill, bf16 (enduro --quantization "
        f"{args.quantization}), {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print("| system | median ms | tokens/s |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.0f} | {args.prompt_tokens / median:,.0f} |")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["enduro"])
    print(f"enduro / transformers speed: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
