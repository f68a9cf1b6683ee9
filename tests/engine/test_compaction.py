"""Compaction on a real engine: a pool fragmented on purpose (the `fragment` fault hands out
the highest free block ids) compacts down to within one segment of what its live blocks
need, while the requests whose blocks moved go on producing the same greedy tokens."""

from collections.abc import Callable
from pathlib import Path

from enduro.config import EngineConfig
from enduro.core.block_pool import cdiv
from enduro.engine.engine_core import EngineCore
from enduro.engine.faults import FaultSettings
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams

SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEGMENT_BLOCKS = 8


def engine(path: Path, *, compact: bool, fragment: bool) -> EngineCore:
    config = EngineConfig.from_kwargs(
        model=str(path),
        dtype="float32",
        block_size=4,
        num_blocks=256,
        kv_cache_initial=1,  # one segment to start with
        kv_segment_blocks=SEGMENT_BLOCKS,
        kv_idle_release=3600.0,  # only compaction releases here
        kv_fragmentation_threshold=0.3,
        max_compaction_moves=6 if compact else 0,
        max_num_seqs=32,
        max_num_batched_tokens=512,
        prefix_cache="off",  # used blocks only: what compaction must move, not drop
    )
    core = EngineCore(config)
    core.faults.arm(FaultSettings(fragment=fragment), core.kv_cache_manager)
    return core


def run(core: EngineCore, watch: Callable[[EngineCore], None]) -> dict[str, list[int]]:
    """4 long requests among 24 short ones; returns every request's tokens."""
    prompts = {f"r{i}": [(7 * i + j) % 200 + 1 for j in range(10 + i % 5)] for i in range(28)}
    for request_id, prompt in prompts.items():
        core.add_request(request_id, prompt, LONG if request_id in LONG_IDS else SHORT)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    while core.has_unfinished_requests():
        for output in core.step():
            tokens[output.request_id].extend(output.new_token_ids)
            assert output.finish_reason in (None, FinishReason.LENGTH)
        core.maintain()
        watch(core)
    return tokens


LONG_IDS = {"r3", "r11", "r19", "r27"}


def test_a_fragmented_pool_compacts_and_outputs_stay_the_same(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    path = tiny_model_dir("llama")
    reference = run(engine(path, compact=False, fragment=False), lambda core: None)
    seen: list[tuple[int, int, int]] = []  # (allocated segments, live blocks, segments needed)

    def watch(core: EngineCore) -> None:
        pool = core.kv_cache_manager.block_pool
        if len(seen) == 4:  # the fragmenting pattern ends; compaction can now catch up
            core.faults.arm(FaultSettings(), core.kv_cache_manager)
        live = pool.num_used_blocks + pool.num_cached_blocks
        seen.append((pool.num_segments, live, max(1, cdiv(live, SEGMENT_BLOCKS))))

    core = engine(path, compact=True, fragment=True)
    tokens = run(core, watch)
    assert tokens == reference
    assert core.num_compaction_moves > 0
    assert core.kv_cache_manager.block_pool.num_segments_released > 0
    peak = max(allocated for allocated, _, _ in seen)
    # A few steps after the short requests finished, while the long ones run on, the pool
    # stays within one segment of what its live blocks need. (Once everything has finished
    # the empty segments wait for kv_idle_release, an hour here.)
    settled = [(allocated, needed) for allocated, live, needed in seen[5:] if live]
    assert len(settled) > 20
    assert peak >= 12 and max(allocated for allocated, _ in settled) <= 7
    assert all(allocated <= needed + 1 for allocated, needed in settled)
