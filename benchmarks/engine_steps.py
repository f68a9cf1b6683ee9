"""Where an engine step's time goes, on the default model, with the engine in this process.

  .venv/bin/python benchmarks/engine_steps.py decode [--streams 16] [--quantization int8]
  .venv/bin/python benchmarks/engine_steps.py chat [--seconds 40] [--quantization int8]

`decode`: 16 streams (temperature 1) past their prompts; the median of 60 steps, and of the
runner's parts in them: building the inputs, the decoder layers, the output projection,
sampling.

`chat`: the served chat workload without the server: 16 streams of 128-token prompts (random
token ids) and 128 new tokens each, a new request as soon as one finishes; output tokens/s,
and the steps split into pure decode steps and steps that also prefill a prompt.
"""

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from enduro.config import QUANTIZATIONS
from enduro.engine.llm import LLM
from enduro.runner import model_runner
from enduro.sampling_params import SamplingParams

Timings = dict[str, list[float]]


def timed(name: str, fn: Callable[..., Any], timings: Timings) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings.setdefault(name, []).append(time.perf_counter() - start)
        return result

    return wrapper


def decode(llm: LLM, streams: int) -> None:
    runner = llm.engine.runner
    timings: Timings = {}
    model_runner.build_model_inputs = timed("inputs", model_runner.build_model_inputs, timings)
    runner.model.forward = timed("decoder layers", runner.model.forward, timings)
    runner.model.compute_logits = timed("output projection", runner.model.compute_logits, timings)
    runner.sampler.sample = timed("sampling", runner.sampler.sample, timings)
    for i in range(streams):
        prompt = f"Story {i}: once upon a time in a land far away there lived"
        llm.add_request(prompt, SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(5):  # prompts, then decode steps only
        llm.step()
    timings.clear()
    steps = []
    for _ in range(60):
        start = time.perf_counter()
        llm.step()
        steps.append(time.perf_counter() - start)
    print(f"{streams}-stream decode step: median {statistics.median(steps) * 1e3:.2f} ms")
    for name, values in timings.items():
        print(f"  {name:18s} {statistics.median(values) * 1e3:7.2f} ms")


def chat(llm: LLM, seconds: float, streams: int) -> None:
    rng = random.Random(0)
    rows: list[int] = []
    steps: dict[str, list[float]] = {"decode only": [], "with a prompt": []}
    build = model_runner.build_model_inputs

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        inputs = build(*args, **kwargs)
        rows.append(int(inputs.input_ids.shape[0]))
        return inputs

    model_runner.build_model_inputs = counting_build
    active: set[str] = set()

    def top_up(max_tokens: Callable[[int], int]) -> None:
        while len(active) < streams:
            prompt = [2] + [rng.randrange(1000, 20000) for _ in range(127)]
            params = SamplingParams(max_tokens=max_tokens(len(active)), ignore_eos=True)
            active.add(llm.add_request(prompt, params))

    def run(until: float, record: bool) -> int:
        produced = 0
        while time.perf_counter() < until:
            start = time.perf_counter()
            outputs = llm.engine.step()
            elapsed = time.perf_counter() - start
            if record and rows:
                kind = "decode only" if rows[-1] <= streams else "with a prompt"
                steps[kind].append(elapsed)
            produced += sum(len(out.new_token_ids) for out in outputs)
            llm.processor.process(outputs)
            done = {rid for rid in active if llm.processor.trackers[rid].finish_reason}
            for rid in done:
                llm.processor.pop(rid)
            active.difference_update(done)
            top_up(lambda _: 128)
        return produced

    top_up(lambda i: 8 * (i + 1))  # staggered, as arrivals are behind a server
    run(time.perf_counter() + 5, record=False)
    start = time.perf_counter()
    produced = run(start + seconds, record=True)
    elapsed = time.perf_counter() - start
    print(f"chat, {streams} streams: {produced / elapsed:.1f} output tokens/s over {elapsed:.0f} s")
    for kind, values in steps.items():
        if values:
            median, total = statistics.median(values) * 1e3, sum(values)
            print(f"  {kind:14s} {len(values):5d} steps, median {median:6.1f} ms, {total:5.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["decode", "chat"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    args = parser.parse_args()
    llm = LLM(None, dtype="bfloat16", max_num_seqs=args.streams, quantization=args.quantization)
    if args.what == "decode":
        decode(llm, args.streams)
    else:
        chat(llm, args.seconds, args.streams)


if __name__ == "__main__":
    main()
