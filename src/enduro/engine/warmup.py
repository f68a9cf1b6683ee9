"""Warm-up: run the shapes the engine will use before it reports ready."""

from enduro.core.scheduler import SchedulerStats
from enduro.engine.engine_core import EngineCore
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams

WARMUP_REQUEST_PREFIX = "__warmup__"


def warm_up(core: EngineCore) -> None:
    """Run each batch shape the loop will see once — a full prefill chunk, a one-request
    decode, a max_num_seqs-wide decode — so the first real request pays no first-call costs
    (allocator growth, kernel selection). Then forget them: cache, counters and all. (Every
    matmul row bucket was already built when the runner loaded: `CausalLM.warm_up`.)"""
    scheduler_config = core.config.scheduler
    vocab_size = core.runner.arch.vocab_size
    capacity = core.runner.layout.max_num_blocks * core.config.cache.block_size
    # Prompt + 2 tokens must fit the context, and all but the last token the pool.
    prompt_len = min(scheduler_config.max_step_tokens, core.runner.max_model_len - 2, capacity - 1)
    prompt = [i % vocab_size for i in range(max(1, prompt_len))]
    _run_dummy_requests(core, "prefill", [prompt])  # a full chunk, then a decode of one
    width = scheduler_config.max_num_seqs
    _run_dummy_requests(core, "decode", [[i % vocab_size] for i in range(width)])
    pool = core.scheduler.kv_cache_manager.block_pool
    pool.reset_prefix_cache()
    core.maintain(force=True)  # back to the initial pool size
    pool.num_evictions = pool.num_segments_grown = pool.num_segments_released = 0
    core.scheduler.stats = SchedulerStats()


def _run_dummy_requests(core: EngineCore, name: str, prompts: list[list[int]]) -> None:
    # Greedy, so the shared sampling generator that unseeded requests draw from is untouched.
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    # Ids unique across rounds: the runner must not see a finished id come back.
    request_ids = [f"{WARMUP_REQUEST_PREFIX}{name}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(request_ids, prompts, strict=True):
        core.add_request(request_id, prompt, params)
    for _ in range(4 * len(prompts) + 8):  # enough to finish them; never loop forever
        if not core.has_unfinished_requests():
            break
        core.step()
    core.finish_requests(request_ids, FinishReason.ABORT)
