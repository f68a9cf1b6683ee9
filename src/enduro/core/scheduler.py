"""Continuous batching: each step, computed tokens catch up with known tokens.

Prefill, chunked prefill, prefix-cache hits and decode are one mechanism: a request has
`num_tokens` known tokens of which `num_computed_tokens` have K/V in the cache; a step
computes up to the token budget of the difference. When a step brings a request level with
its known tokens, the model samples its next token. When blocks run out, the most recently
admitted running request is preempted: its blocks are freed and it is recomputed later.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from enduro.config import CacheConfig, SchedulerConfig
from enduro.core.block_pool import PoolLayout
from enduro.core.kv_cache_manager import KVCacheManager
from enduro.request import FinishReason, Request, RequestStatus
from enduro.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """What the runner needs once per request to sample it (sent on first schedule)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens computed this step
    num_computed_tokens: int  # their first position
    block_ids: list[int]  # the whole block table after this step's allocation
    sample: bool  # this step reaches the last known token: sample the next one


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: list[NewRequestData]
    scheduled: list[ScheduledRequest]
    finished_request_ids: list[str]  # the runner drops their sampling state

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0  # of those, tokens served from it
    num_prefill_tokens: int = 0  # prompt tokens actually computed (recomputes included)
    num_steps: int = 0


@dataclass
class Scheduler:
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    layout: PoolLayout | int  # an int is a static pool of that many blocks
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    # Called with each request about to give its blocks back (finished, aborted).
    on_release: Callable[[Request], None] | None = None

    def __post_init__(self) -> None:
        self.kv_cache_manager = KVCacheManager(
            self.layout, self.cache_config.block_size, self.cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._known_to_runner: set[str] = set()
        self._finished_ids: list[str] = []

    # ---- admission -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or finish it at once with ERROR if it could never run."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        error = self._never_fits(request)
        if error is not None:
            request.finish(FinishReason.ERROR, error)
            return
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _never_fits(self, request: Request) -> str | None:
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            return "the prompt is empty"
        max_tokens = request.sampling_params.max_tokens or (self.max_model_len - num_prompt)
        total = num_prompt + max_tokens
        if total > self.max_model_len:
            return (
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} tokens "
                f"is beyond the context length of {self.max_model_len}"
            )
        # The last sampled token is never written to the cache.
        needed = self.kv_cache_manager.num_blocks_needed(total - 1)
        max_num_blocks = self.kv_cache_manager.block_pool.max_num_blocks
        if needed > max_num_blocks:
            return f"prompt + max_tokens needs {needed} KV blocks; the pool has {max_num_blocks}"
        return None

    def finish_requests(self, request_ids: list[str], reason: FinishReason) -> None:
        """Stop requests from outside (abort, stop string); unknown ids are ignored."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish(reason)
            self._release(request)

    def _release(self, request: Request) -> None:
        if self.on_release is not None:
            self.on_release(request)
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.scheduler_config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        new_requests: list[NewRequestData] = []
        num_preemptions = self.stats.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new):
                break  # the request preempted itself: nothing after it is left
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1
        # After a preemption the pool is full: admitting more would only thrash.
        if self.stats.num_preemptions == num_preemptions:
            budget = self._admit_waiting(budget, scheduled)
        for entry in scheduled:
            if entry.request_id not in self._known_to_runner:
                request = self.requests[entry.request_id]
                self._known_to_runner.add(entry.request_id)
                new_requests.append(
                    NewRequestData(
                        request.request_id, request.prompt_token_ids, request.sampling_params
                    )
                )
        finished, self._finished_ids = self._finished_ids, []
        self.stats.num_steps += 1
        return SchedulerOutput(new_requests, scheduled, finished)

    def _allocate_or_preempt(self, request: Request, num_new: int) -> bool:
        """Allocate for a running request, preempting from the back until it fits.

        Returns False if the request had to preempt itself.
        """
        while self.kv_cache_manager.allocate_slots(request, num_new) is None:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        max_seqs = self.scheduler_config.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) < max_seqs:
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = self._chunk(request.num_tokens - num_hit_tokens, budget)
            if self.kv_cache_manager.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            if request.status is RequestStatus.WAITING:
                self.stats.num_prefix_queries += request.num_tokens
                self.stats.num_prefix_hits += num_hit_tokens
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens of a request to compute now: all that remain if they fit the budget or
        overrun it by at most `chunk_tail` (the step then ends: its budget is spent), else
        the budget's worth."""
        if remaining <= budget + self.scheduler_config.chunk_tail:
            return remaining
        return budget

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        if start < request.num_prompt_tokens:
            self.stats.num_prefill_tokens += min(start + num_new, request.num_prompt_tokens) - start
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            num_computed_tokens=start,
            block_ids=self.kv_cache_manager.block_ids(request.request_id),
            sample=start + num_new == request.num_tokens,
        )

    # ---- after the forward -----------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled ones, finish what is done.

        Returns the requests that got a new token or finished this step.
        """
        changed = []
        for entry in output.scheduled:
            request = self.requests.get(entry.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # preempted or finished while this step ran
            request.num_computed_tokens += len(entry.token_ids)
            token = sampled.get(entry.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            reason = self._check_stop(request, token)
            if reason is not None:
                self.running.remove(request)
                request.finish(reason)
                self._release(request)
            changed.append(request)
        return changed

    def _check_stop(self, request: Request, token: int) -> FinishReason | None:
        params = request.sampling_params
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
