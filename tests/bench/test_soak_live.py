"""The clean soak CI runs: 3 minutes of the mixed workload on a real `enduro serve` of a tiny
model, with the guard at heal. No alert, memory flat, no failed request."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from enduro.bench.soak import SoakOptions, run_soak
from tests.conftest import build_tiny_tokenizer, tiny_config


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with a 32k context: the tiny tokenizer makes ~3.5 tokens of an English
    word, so the workloads' prompts (a 650-token agent system prompt) are long for it."""
    config = tiny_config("llama")
    config.max_position_embeddings = 32768
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-long")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.asyncio
async def test_a_three_minute_clean_soak_passes(long_context_model: Path, tmp_path: Path) -> None:
    serve_args = (
        *(f"--model={long_context_model}", "--dtype=float32", "--num-blocks=8192"),
        *("--max-num-seqs=8", "--guard=heal"),
        # With the tiny tokenizer (~3.5 tokens a word) each request is thousands of tokens
        # of JSON and text; the API process's lazy start (imports, tokenizer caches) then
        # lasts about 2.5 minutes, longer than the guard's default 2-minute warm-up, and a
        # 3-minute run cannot tell that tail from a leak. The soak's own memory verdict
        # (below) still fits the whole run after its warm-up.
        "--guard-warmup=150",
    )
    options = SoakOptions(
        duration=180,
        concurrency=4,
        workload="mixed",
        report_dir=tmp_path,
        interval=5,
        # The same warm-up tail, seen from the client: leave the first 90 s out of the
        # memory fit (by default 10 % of the run, 18 s).
        warmup=90,
        serve_args=serve_args,
        show_progress=False,
        # Sessions grow over the run, so TPOT rises with their contexts; on a shared 2-core
        # machine with a tiny model that is not a regression. The recorded soaks measure it.
        max_drift=3.0,
    )
    verdict = await run_soak(options)
    report = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict.passed, report
    assert report["alerts"] == []
    assert report["requests"]["failed"] == 0
    assert report["requests"]["ok"] > 20
    for name in ("soak.csv", "verdict.md", "memory.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0
