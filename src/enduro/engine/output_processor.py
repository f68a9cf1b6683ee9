"""Engine-core outputs → text: incremental detokenization, stop strings, accumulated results."""

from dataclasses import dataclass, field

from enduro.outputs import CompletionOutput, EngineCoreOutput, RequestOutput, TokenLogprobs
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class RequestTracker:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    matcher: StopStringMatcher
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_cached_tokens: int = 0

    def to_output(self) -> RequestOutput:
        prompt_logprobs: list[TokenLogprobs | None] | None = None
        if self.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *self.prompt_logprobs]
        completion = CompletionOutput(
            index=0,
            text=self.matcher.text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason,
            error=self.error,
        )
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            prompt_logprobs,
            [completion],
            self.num_cached_tokens,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.trackers: dict[str, RequestTracker] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.trackers[request_id] = RequestTracker(
            request_id, prompt, prompt_token_ids, params, detokenizer, matcher
        )

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[dict[str, str], list[str]]:
        """Apply core outputs; returns (visible text delta per request, ids that hit a stop
        string and must be finished in the core)."""
        deltas: dict[str, str] = {}
        stopped: list[str] = []
        for out in outputs:
            tracker = self.trackers.get(out.request_id)
            if tracker is None or tracker.finish_reason is not None:
                continue
            tracker.prompt_logprobs.extend(out.new_prompt_logprobs)
            tracker.logprobs.extend(out.new_logprobs)
            tracker.token_ids.extend(out.new_token_ids)
            tracker.num_cached_tokens = out.num_cached_tokens
            text = "".join(
                tracker.detokenizer.add(t) for t in out.new_token_ids if tracker.detokenizer
            )
            delta = tracker.matcher.add(text)
            if tracker.matcher.stopped:
                tracker.finish_reason = FinishReason.STOP
                stopped.append(out.request_id)
            elif out.finish_reason is not None:
                tracker.finish_reason = out.finish_reason
                tracker.error = out.error
                delta += tracker.matcher.flush()
            deltas[out.request_id] = delta
        return deltas, stopped

    def pop(self, request_id: str) -> RequestOutput:
        return self.trackers.pop(request_id).to_output()
