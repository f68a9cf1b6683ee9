"""What generation hands back: per-token logprobs and per-request outputs."""

from dataclasses import dataclass, field

from enduro.request import FinishReason


@dataclass(frozen=True)
class TokenLogprobs:
    """The logprob of one chosen (or given) token and the top alternatives at its position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: FinishReason | None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # One entry per prompt token when requested; the first is None (nothing predicts it).
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(output.finished for output in self.outputs)


@dataclass
class EngineCoreOutput:
    """What one engine step reports for one request: plain data, so it crosses processes."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    # On the request's first output only: when the engine first scheduled it, in
    # time.monotonic() seconds (CLOCK_MONOTONIC, shared by the processes of one host).
    first_scheduled_time: float | None = None
