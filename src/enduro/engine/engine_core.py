"""The step loop's body: schedule, run the model, update requests, report what changed.

Everything it returns is plain data, so it can cross a process boundary unchanged.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from enduro.config import EngineConfig
from enduro.core.scheduler import Scheduler
from enduro.engine.faults import Faults
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason, Request
from enduro.runner.model_runner import ModelRunner
from enduro.sampling_params import SamplingParams


@dataclass(frozen=True)
class MaintenanceReport:
    num_moves: int
    released_segments: list[int]


class EngineCore:
    def __init__(
        self, config: EngineConfig, progress: Callable[[str, int, int], None] | None = None
    ) -> None:
        self.config = config
        self.runner = ModelRunner(config, progress)
        self.faults = Faults()
        self.scheduler = Scheduler(
            scheduler_config=config.scheduler,
            cache_config=config.cache,
            layout=self.runner.layout,
            max_model_len=self.runner.max_model_len,
            eos_token_ids=self.runner.arch.eos_token_ids,
            on_release=self._on_release,
        )
        self.kv_cache_manager = self.scheduler.kv_cache_manager
        self.num_compaction_moves = 0
        self._commit_grown_segments()
        self._rejected: list[EngineCoreOutput] = []
        # When each request was first scheduled, until its first output reports it.
        self._first_scheduled: dict[str, float] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        vocab_size = self.runner.arch.vocab_size
        request = Request(request_id, list(prompt_token_ids), params)
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            request.finish(FinishReason.ERROR, f"token id {bad[0]} is outside the vocabulary")
        else:
            self.scheduler.add_request(request)
        if request.is_finished:  # rejected: report it with the next step's outputs
            self._rejected.append(
                EngineCoreOutput(
                    request_id, finish_reason=request.finish_reason, error=request.error
                )
            )

    def finish_requests(self, request_ids: list[str], reason: FinishReason) -> None:
        self.scheduler.finish_requests(request_ids, reason)
        for request_id in request_ids:
            self._first_scheduled.pop(request_id, None)

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the allocated KV segments."""
        return (
            self.kv_cache_manager.block_pool.num_segments * self.runner.kv_cache.bytes_per_segment
        )

    @property
    def kv_host_reserved_bytes(self) -> int:
        """Host memory reserved for the KV pool at its maximum (`KVCache.host_reserved_bytes`)."""
        return self.runner.kv_cache.host_reserved_bytes

    def _on_release(self, request: Request) -> None:
        self.faults.on_finished(request, self.kv_cache_manager)

    def _commit_grown_segments(self) -> None:
        pool = self.kv_cache_manager.block_pool
        while pool.grown_segments:
            self.runner.kv_cache.commit_segment(pool.grown_segments.pop())

    def maintain(self, force: bool = False) -> MaintenanceReport:
        """Between steps: compact the KV pool when it is fragmented and memory could be
        returned (a bounded number of moves per call), release segments that compaction
        emptied or that stayed empty for kv_idle_release seconds. `force` compacts whatever
        the fragmentation and releases empty segments at once (the guard's trim)."""
        cache = self.config.cache
        pool = self.kv_cache_manager.block_pool
        moves: list[tuple[int, int]] = []
        fragmented = pool.fragmentation > cache.kv_fragmentation_threshold
        if (force or fragmented) and pool.num_reclaimable_segments > 0:
            moves = self.kv_cache_manager.compact(cache.max_compaction_moves)
            self.runner.kv_cache.copy_blocks(moves)
            self.num_compaction_moves += len(moves)
        idle = 0.0 if force or moves else cache.kv_idle_release
        released = pool.release_empty_segments(idle)
        for segment in released:
            self.runner.kv_cache.release_segment(segment)
        return MaintenanceReport(len(moves), released)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests or bool(self._rejected)

    def step(self) -> list[EngineCoreOutput]:
        outputs, self._rejected = self._rejected, []
        self.faults.before_step()
        scheduled_at = time.monotonic()
        scheduler_output = self.scheduler.schedule()
        self._commit_grown_segments()
        for new in scheduler_output.new_requests:  # the runner sees each request once
            self._first_scheduled[new.request_id] = scheduled_at
        runner_output = self.runner.execute(scheduler_output)
        prompt_logprobs = runner_output.prompt_logprobs
        changed = self.scheduler.update_from_output(scheduler_output, runner_output.sampled)
        reported = set()
        for request in changed:
            rid = request.request_id
            logprob = runner_output.logprobs.get(rid)
            outputs.append(
                EngineCoreOutput(
                    rid,
                    new_token_ids=[request.output_token_ids[-1]],
                    new_logprobs=[logprob] if logprob is not None else [],
                    new_prompt_logprobs=prompt_logprobs.get(rid, []),
                    finish_reason=request.finish_reason,
                    num_cached_tokens=request.num_cached_tokens,
                    first_scheduled_time=self._first_scheduled.pop(rid, None),
                )
            )
            reported.add(rid)
        # Prompt logprobs of a chunk that did not sample yet still go out now.
        for rid, scored in prompt_logprobs.items():
            if rid not in reported:
                first = self._first_scheduled.pop(rid, None)
                outputs.append(
                    EngineCoreOutput(rid, new_prompt_logprobs=scored, first_scheduled_time=first)
                )
        return outputs
