"""llama-cpp-python on the same GGUF file as enduro: single-stream decode and prompt prefill.

The binding runs one sequence at a time, so it has no concurrency figure. Decode counts
generated tokens over wall time with the prefill included, as `enduro bench offline` does, on
the same prompts; EOS is banned through logit_bias so every request makes `--max-tokens`
tokens. Prefill times one eval of a `--prompt-tokens` prompt from an empty cache.

Usage: .venv/bin/python benchmarks/baselines/llama_cpp_python.py [--json OUT]
(needs `make bench-deps`).
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from enduro.bench.offline import PROMPTS
from enduro.bench.workloads import text_of_tokens
from enduro.loading.loader import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file; default: the default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from llama_cpp import Llama  # a bench-deps extra, not a dependency

    path = resolve_model_path(args.model)
    llm = Llama(
        model_path=str(path), n_ctx=2048, n_batch=512, n_threads=args.threads, verbose=False
    )
    eos = llm.token_eos()
    llm.create_completion(PROMPTS[0], max_tokens=4, temperature=0.0)  # warm-up

    decode: list[float] = []
    for i in range(args.repeats):
        llm.reset()
        started = time.perf_counter()
        out = llm.create_completion(
            PROMPTS[i % len(PROMPTS)],
            max_tokens=args.max_tokens,
            temperature=0.0,
            logit_bias={eos: -1e9},
        )
        elapsed = time.perf_counter() - started
        generated = out["usage"]["completion_tokens"]
        assert generated == args.max_tokens, generated
        decode.append(generated / elapsed)
        print(f"decode {i + 1}/{args.repeats}: {decode[-1]:.1f} tok/s", flush=True)

    prefill: list[float] = []
    text = text_of_tokens(random.Random(0), args.prompt_tokens)
    tokens = llm.tokenize(text.encode())[: args.prompt_tokens]
    for i in range(args.repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prefill.append(len(tokens) / (time.perf_counter() - started))
        print(f"prefill {i + 1}/{args.repeats}: {len(tokens)} tokens, {prefill[-1]:.0f} tok/s")

    result = {
        "system": "llama-cpp-python",
        "model": str(path.name),
        "threads": args.threads,
        "decode_tokens_per_s": statistics.median(decode),
        "decode_runs": decode,
        "prefill_tokens": len(tokens),
        "prefill_tokens_per_s": statistics.median(prefill),
        "prefill_runs": prefill,
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
