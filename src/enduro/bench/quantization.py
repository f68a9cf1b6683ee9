"""`enduro bench quantization`: each `--quantization` setting's decode speed next to what it
costs in quality, in one run.

Quality is the perplexity of the model on a fixed public-domain text shipped with enduro (the
opening of Mark Twain's *The Adventures of Tom Sawyer*, 1876): every token after the first is
scored from the prompt logprobs of one request, perplexity = exp(−mean logprob). Speed is
decode tokens/s with every request generating exactly `max_tokens` tokens (EOS ignored), wall
time including prefill, at each stream count. Settings load one after the other into fresh
engines of the same dtype.
"""

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from rich.table import Table

from enduro.engine.llm import LLM
from enduro.sampling_params import SamplingParams

PROMPT_TOKENS = 16  # each stream's prompt: the first tokens of the text


def reference_text() -> str:
    return resources.files("enduro.bench").joinpath("data/tom_sawyer.txt").read_text()


@dataclass(frozen=True)
class QuantizationResult:
    setting: str
    tokens_per_s: dict[int, float]  # streams → decode tokens/s
    perplexity: float


def perplexity(llm: LLM, token_ids: Sequence[int]) -> float:
    """exp(−mean logprob) of tokens 1.. given the ones before them."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    (output,) = llm.generate([list(token_ids)], params)
    assert output.prompt_logprobs is not None
    logprobs = [lp.logprob for lp in output.prompt_logprobs[1:] if lp is not None]
    assert len(logprobs) == len(token_ids) - 1
    return math.exp(-sum(logprobs) / len(logprobs))


def decode_tokens_per_second(
    llm: LLM, prompt: Sequence[int], streams: int, max_tokens: int
) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([list(prompt)] * streams, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return streams * max_tokens / elapsed


def measure_setting(
    setting: str,
    model: str | None,
    dtype: str,
    token_ids: Sequence[int],
    streams: Sequence[int],
    max_tokens: int,
) -> QuantizationResult:
    llm = LLM(model, dtype=dtype, quantization=setting, max_num_seqs=max(streams))
    prompt = token_ids[:PROMPT_TOKENS]
    decode_tokens_per_second(llm, prompt, 2, 4)  # warm-up: first-call kernel setup
    speeds = {count: decode_tokens_per_second(llm, prompt, count, max_tokens) for count in streams}
    result = QuantizationResult(setting, speeds, perplexity(llm, token_ids))
    del llm
    gc.collect()  # one model's weights at a time
    return result


def run_quantization_benchmark(
    model: str | None,
    settings: Sequence[str],
    streams: Sequence[int],
    max_tokens: int,
    dtype: str = "auto",
    token_ids: Sequence[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[QuantizationResult]:
    """Each setting's speeds and perplexity; `token_ids` default to the reference text as the
    model's tokenizer encodes it."""
    if token_ids is None:
        tokenizer = LLM(model, dtype=dtype, num_blocks=16).tokenizer
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: pass token_ids")
        token_ids = tokenizer.encode(reference_text())
    results = []
    for done, setting in enumerate(settings):
        if progress is not None:
            progress("quantization settings", done, len(settings))
        results.append(measure_setting(setting, model, dtype, token_ids, streams, max_tokens))
    return results


def quantization_table(results: Sequence[QuantizationResult], max_tokens: int) -> Table:
    """Speeds as tokens/s and as a ratio to the first setting; perplexity and its change."""
    base = results[0]
    table = Table(title=f"decode tokens/s ({max_tokens} new tokens per stream) and perplexity")
    table.add_column("quantization")
    streams = list(base.tokens_per_s)
    for count in streams:
        table.add_column(f"{count} stream{'s' if count > 1 else ''}", justify="right")
    table.add_column("perplexity", justify="right")
    for result in results:
        cells = [
            f"{result.tokens_per_s[c]:.1f} ({result.tokens_per_s[c] / base.tokens_per_s[c]:.2f}x)"
            for c in streams
        ]
        change = result.perplexity / base.perplexity - 1
        table.add_row(result.setting, *cells, f"{result.perplexity:.2f} ({change:+.1%})")
    return table
