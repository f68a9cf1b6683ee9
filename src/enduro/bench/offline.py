"""Offline decode throughput: enduro's engine next to transformers `generate`, same run.

Every request generates exactly `max_tokens` tokens (EOS ignored); tokens/s counts generated
tokens over wall time, prefill included, for both systems alike.
"""

import time
from collections.abc import Callable

import torch
from rich.table import Table

from enduro.engine.llm import LLM
from enduro.sampling_params import SamplingParams

PROMPTS = (
    "The history of the city begins in the",
    "To make a good cup of tea, first",
    "The main difference between a comet and an asteroid is",
    "In the morning the village market",
    "Photosynthesis is the process by which",
    "The old lighthouse keeper looked out at the sea and",
    "A simple recipe for bread needs flour, water,",
    "The first law of thermodynamics states that",
)


def workload(concurrency: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]


def time_enduro(llm: LLM, prompts: list[str], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return len(prompts) * max_tokens / elapsed


def build_transformers_model(llm: LLM) -> torch.nn.Module:
    """transformers' implementation holding the same weights enduro loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(llm.engine.runner.files.hf_config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=llm.engine.runner.dtype)
    state = dict(llm.engine.runner.files.weights())
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state:
        model.tie_weights()
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"baseline weights do not fit: {missing[:3]} {unexpected[:3]}")
    return model.eval()


def time_transformers(
    model: torch.nn.Module, llm: LLM, prompts: list[str], max_tokens: int
) -> float:
    from transformers import AutoTokenizer

    assert llm.engine.runner.files.tokenizer_dir is not None
    tokenizer = AutoTokenizer.from_pretrained(str(llm.engine.runner.files.tokenizer_dir))
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            **batch,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - batch["input_ids"].shape[1] == max_tokens
    return len(prompts) * max_tokens / elapsed


def run_offline_benchmark(
    model: str | None,
    dtype: str,
    max_tokens: int,
    concurrency: list[int],
    baseline: bool,
    progress: Callable[[str, int, int], None] | None = None,
    quantization: str = "none",
    compile: bool = False,
) -> Table:
    llm = LLM(
        model,
        progress=progress,
        dtype=dtype,
        max_num_seqs=max(concurrency),
        quantization=quantization,
        compile=compile,
    )
    # Warm-up: one stream and two (with --compile: the one-token step and the dynamic graph
    # for the others are compiled here, not in the timed runs).
    for count in (1, 2):
        llm.generate(workload(count), SamplingParams(max_tokens=4, ignore_eos=True))
    hf_model = build_transformers_model(llm) if baseline else None
    table = Table(
        title=(
            f"decode tokens/s, {max_tokens} new tokens per request, {llm.engine.runner.dtype}"
            f", quantization {quantization}{', compiled' if compile else ''}"
        )
    )
    for column in ("concurrency", "enduro", "transformers", "ratio"):
        table.add_column(column, justify="right")
    total = len(concurrency)
    for done, count in enumerate(concurrency):
        if progress is not None:
            progress("benchmark", done, total)
        prompts = workload(count)
        ours = time_enduro(llm, prompts, max_tokens)
        theirs = time_transformers(hf_model, llm, prompts, max_tokens) if hf_model else None
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        table.add_row(str(count), f"{ours:.1f}", f"{theirs:.1f}" if theirs else "-", ratio)
    return table
