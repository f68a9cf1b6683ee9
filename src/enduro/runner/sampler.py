"""Batched sampling with per-request settings, seeded generators and logprobs.

Logprobs are taken from the model's raw distribution (before penalties and temperature), so
they mean the same thing whatever sampling settings a request uses.
"""

from dataclasses import dataclass, field

import torch

from enduro.outputs import TokenLogprobs
from enduro.sampling_params import SamplingParams


@dataclass
class RequestState:
    """Sampling state the runner keeps for a request across steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Prompt positions whose logprobs were already returned (a recompute after preemption
    # must not return them twice).
    num_prompt_logprobs_done: int = 0


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)

    def new_state(self, params: SamplingParams, prompt_token_ids: list[int]) -> RequestState:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return RequestState(params, prompt_token_ids, generator=generator)

    def sample(
        self, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [R, V] float32, one row per request in `states`."""
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in states):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(s.params.has_penalties for s in states):
            logits = apply_penalties(logits, states)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            chosen = [states[i] for i in random_rows]
            tokens[rows] = self._sample_random(logits[rows], chosen)
        token_ids: list[int] = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        if raw_logprobs is not None:
            for i, state in enumerate(states):
                if state.params.logprobs is not None:
                    logprobs[i] = token_logprobs(
                        raw_logprobs[i], token_ids[i], state.params.logprobs
                    )
        return token_ids, logprobs

    def _sample_random(self, logits: torch.Tensor, states: list[RequestState]) -> torch.Tensor:
        temperatures = torch.tensor([s.params.temperature for s in states], device=logits.device)
        logits = logits / temperatures.unsqueeze(1)
        logits = apply_top_k_top_p_min_p(logits, states)
        # Inverse CDF: one uniform draw u per row picks the first token whose cumulative
        # probability exceeds u * total. Drawing each row's u from its own generator keeps a
        # seeded request's tokens independent of whatever else is in the batch. (An
        # exponential race, argmax p / E, needs a draw per vocabulary entry: 9 ms a row for
        # Gemma 3's 262k tokens, 150 ms of a 16-row step.) float64 sums keep the cumulative
        # probabilities exact enough that u * total < total, and `right=True` never lands on
        # a zero-probability token: cdf[i] > x >= cdf[i - 1] means p[i] > 0.
        cdf = torch.softmax(logits, dim=-1).double().cumsum_(dim=-1)
        uniforms = torch.cat(
            [
                torch.rand(
                    1,
                    dtype=torch.float64,
                    generator=state.generator or self.shared_generator,
                    device=logits.device,
                )
                for state in states
            ]
        )
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)
        tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
        return tokens.clamp_(max=logits.shape[1] - 1)  # u * total rounded up to total: 2^-53


def apply_penalties(logits: torch.Tensor, states: list[RequestState]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    output_counts = torch.zeros((num_rows, vocab_size), device=device)
    seen = torch.zeros((num_rows, vocab_size), dtype=torch.bool, device=device)
    for i, state in enumerate(states):
        if state.output_token_ids:
            ids = torch.tensor(state.output_token_ids, device=device)
            output_counts[i].index_add_(0, ids, torch.ones(len(ids), device=device))
        if state.params.repetition_penalty != 1.0 and state.prompt_token_ids:
            seen[i, torch.tensor(state.prompt_token_ids, device=device)] = True
    seen |= output_counts > 0

    def column(name: str) -> torch.Tensor:
        values = [getattr(s.params, name) for s in states]
        return torch.tensor(values, device=device, dtype=logits.dtype).unsqueeze(1)

    repetition = column("repetition_penalty")
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits = logits - column("frequency_penalty") * output_counts
    return logits - column("presence_penalty") * (output_counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, states: list[RequestState]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets with -inf."""
    params = [s.params for s in states]
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0 for p in params):
        return logits
    device = logits.device
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device).unsqueeze(0)
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device).unsqueeze(1)
    remove = ranks >= top_k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    remove |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    remove |= sorted_probs < min_p * sorted_probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """Logprob and rank of `token_id` in a [V] logprob row, with the top `num_top` tokens."""
    value = logprobs[token_id]
    rank = int((logprobs > value).sum().item()) + 1
    top_ids: list[int] = []
    top_values: list[float] = []
    if num_top > 0:
        top = logprobs.topk(num_top)
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return TokenLogprobs(token_id, float(value.item()), rank, top_ids, top_values)
