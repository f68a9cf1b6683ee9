"""How one request wants its tokens chosen and when it wants generation to stop."""

import math
from dataclasses import dataclass

# Caps on client-controlled sizes, checked before anything is allocated.
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

# Below this a temperature means greedy decoding: dividing logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping settings. Validated on construction (ValueError)."""

    max_tokens: int | None = 16
    """New tokens to generate at most; None = up to the context length."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = all tokens."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Same seed → same tokens, whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first match."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives."""
    prompt_logprobs: int | None = None
    """Return logprobs of every prompt token (the first is None) and this many alternatives."""
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2]")
        rep = self.repetition_penalty
        _check(_finite(rep) and 0 < rep <= 2, "repetition_penalty must be in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            ok = value is None or 0 <= value <= MAX_LOGPROBS
            _check(ok, f"{name} must be between 0 and {MAX_LOGPROBS}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            _check(0 < len(s) <= MAX_STOP_STRING_CHARS, "stop strings must be 1-256 characters")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
