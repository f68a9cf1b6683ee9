"""Batched sampling with per-request settings, seeded generators and logprobs.

Logprobs are taken from the model's raw distribution (before penalties and temperature), so
they mean the same thing whatever sampling settings a request uses.
"""

from dataclasses import dataclass, field

import torch

from enduro import native
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


def natively_sampled(params: SamplingParams) -> bool:
    """Whether the native sampler can take a request's rows: greedy, or a temperature with no
    logprobs, penalties or top-k / top-p / min-p filters."""
    return (
        params.logprobs is None
        and not params.has_penalties
        and params.top_k == 0
        and params.top_p >= 1.0
        and params.min_p == 0.0
    )


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
        """logits: [R, V], one row per request in `states`, float32 or the model's bf16.

        Rows asking for nothing but a temperature (`natively_sampled`) go to the native
        sampler when it is loaded, which reads the logits as they are; the others take the
        torch path in float32. The choice rests on each row's own settings, so a seeded
        request draws the same tokens whatever shares its batch."""
        readable = logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32)
        library = native.load() if readable else None
        on_native = [library is not None and natively_sampled(s.params) for s in states]
        token_ids: list[int] = [0] * len(states)
        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        for native_part in (True, False):
            rows = [i for i, flag in enumerate(on_native) if flag == native_part]
            if not rows:
                continue
            part = logits if len(rows) == len(states) else logits[torch.tensor(rows)]
            chosen = [states[i] for i in rows]
            if library is not None and native_part:
                tokens = self._sample_native(library, part, chosen)
                part_logprobs: list[TokenLogprobs | None] = [None] * len(rows)
            else:
                tokens, part_logprobs = self._sample_torch(part.float(), chosen)
            for i, token, lp in zip(rows, tokens, part_logprobs, strict=True):
                token_ids[i], logprobs[i] = token, lp
        return token_ids, logprobs

    def _sample_native(
        self, library: native.Library, logits: torch.Tensor, states: list[RequestState]
    ) -> list[int]:
        """Greedy rows' argmax and the others' inverse-CDF draws in `native/sample.c`, one
        uniform per sampled row from its own generator, as on the torch path."""
        logits = logits.contiguous()
        temperatures = torch.tensor(
            [0.0 if s.params.greedy else s.params.temperature for s in states],
            dtype=torch.float32,
        )
        uniforms = torch.zeros(len(states), dtype=torch.float64)
        for i, state in enumerate(states):
            if not state.params.greedy:
                generator = state.generator or self.shared_generator
                uniforms[i] = torch.rand(1, dtype=torch.float64, generator=generator)
        tokens = torch.empty(len(states), dtype=torch.int64)
        status = library.sample(
            logits.data_ptr(),
            logits.dtype == torch.bfloat16,
            len(states),
            logits.shape[1],
            temperatures.data_ptr(),
            uniforms.data_ptr(),
            tokens.data_ptr(),
        )
        if status != 0:
            raise MemoryError("sampling: scratch memory could not be allocated")
        token_ids: list[int] = tokens.tolist()
        return token_ids

    def _sample_torch(
        self, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [R, V] float32."""
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in states):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(s.params.has_penalties for s in states):
            logits = apply_penalties(logits, states)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        # argmax and the row copy each read the whole [R, 262k] logits: an all-sampled batch
        # needs neither.
        if len(random_rows) == len(states):
            tokens = self._sample_random(logits, states)
        else:
            tokens = logits.argmax(dim=-1)
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
        temperatures = [s.params.temperature for s in states]
        if any(t != 1.0 for t in temperatures):  # the default: a pass over [R, V] saved
            logits = logits / torch.tensor(temperatures, device=logits.device).unsqueeze(1)
        logits, token_ids = filter_top_k_top_p_min_p(logits, states)
        # One uniform per row, from the row's own generator: a seeded request's tokens do not
        # depend on whatever else is in the batch.
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
        columns = inverse_cdf_draw(torch.softmax(logits, dim=-1), uniforms)
        tokens = columns if token_ids is None else token_ids.gather(1, columns.unsqueeze(1))
        return tokens.view(-1)


# Width of the blocks `inverse_cdf_draw` sums first.
DRAW_BLOCK = 512


def inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row of probs [R, N], the first column whose cumulative probability exceeds
    uniforms[r] * the row's total; never a column of probability 0. Returns [R].

    (An exponential race, argmax p / E, needs a random draw per column: 9 ms a row for Gemma
    3's 262k tokens. A float64 cumulative sum of the whole row costs a conversion and a
    sequential pass over it.) In two levels instead: sums of DRAW_BLOCK-wide blocks locate the
    block, a cumulative sum inside it the column, in float64 so that u * total stays below
    total. `right=True` lands on a block or column whose own mass is positive (cdf[i] > x >=
    cdf[i - 1]); where rounding puts the target past the last one, it is clamped to the last
    block and column that hold mass.
    """
    num_rows, width = probs.shape
    num_blocks = -(-width // DRAW_BLOCK)
    padded = probs
    if num_blocks * DRAW_BLOCK != width:
        padded = torch.nn.functional.pad(probs, (0, num_blocks * DRAW_BLOCK - width))
    blocks = padded.view(num_rows, num_blocks, DRAW_BLOCK)
    block_mass = blocks.sum(dim=-1, dtype=torch.float64)  # [R, num_blocks]
    block_cdf = block_mass.cumsum(dim=-1)
    targets = (uniforms * block_cdf[:, -1]).unsqueeze(1)
    block = torch.searchsorted(block_cdf, targets, right=True)
    block = torch.minimum(block, _last_positive(block_mass))
    before = torch.where(
        block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(targets)
    )
    rows = torch.arange(num_rows, device=probs.device)
    inside = blocks[rows, block.view(-1)].double()  # [R, DRAW_BLOCK]
    column = torch.searchsorted(inside.cumsum(dim=-1), targets - before, right=True)
    column = torch.minimum(column, _last_positive(inside))
    return (block * DRAW_BLOCK + column).view(-1)


def _last_positive(values: torch.Tensor) -> torch.Tensor:
    """[R, 1] index of the last positive entry of each row of values [R, N] (0 if none)."""
    positions = torch.arange(values.shape[1], device=values.device)
    return torch.where(values > 0, positions, 0).amax(dim=-1, keepdim=True)


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


# Tokens a row's filters are first worked out on: the highest logits, found with topk.
CANDIDATES = 1024


def apply_top_k_top_p_min_p(logits: torch.Tensor, states: list[RequestState]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets with -inf."""
    kept, token_ids = filter_top_k_top_p_min_p(logits, states)
    if token_ids is None:
        return kept
    return torch.full_like(logits, float("-inf")).scatter_(1, token_ids, kept)


def filter_top_k_top_p_min_p(
    logits: torch.Tensor, states: list[RequestState]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's top-k, nucleus (top-p) and min-p filters, as (kept, token_ids): kept [R, N]
    logits with the dropped tokens at -inf, and the vocabulary id of each column (ascending),
    or None when the columns are the vocabulary itself.

    Sorting a 262k-token row takes ≈30 ms, half a second for 16 rows a step. A row's kept set
    almost always lies among its CANDIDATES highest logits (on the default model's sampled
    decode steps, top-p 0.9 keeps 5 tokens at the median, 171 at most), and when it provably
    does (`_kept_among_candidates`) the filters run on those alone, and the caller samples
    among them; otherwise on the full sort.
    """
    params = [s.params for s in states]
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0 for p in params):
        return logits, None
    vocab_size = logits.shape[1]
    num_candidates = max(CANDIDATES, *(p.top_k for p in params))
    if num_candidates < vocab_size:
        values, order = logits.topk(num_candidates, dim=-1)  # sorted, highest first
        # The candidates' probabilities under the whole row's softmax (one fused pass).
        probs = torch.softmax(logits, dim=-1).gather(1, order)
        if bool(_kept_among_candidates(probs, params).all()):
            kept = _filter_sorted(values, params, probs.sum(dim=-1, keepdim=True))
            # Columns back in token-id order, as over the whole vocabulary: an inverse-CDF
            # draw then picks the same token whichever path ran (the path depends on the
            # rest of the batch, and topk and sort may order tied logits differently).
            token_ids, by_id = order.sort(dim=-1)
            return kept.gather(1, by_id), token_ids
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kept = _filter_sorted(sorted_logits, params)
    return torch.empty_like(logits).scatter_(1, order, kept), None


def _kept_among_candidates(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R] whether each row's filters drop every token ranked below its candidates.

    probs: [R, C] the C candidates' probabilities under the full softmax, highest first. A
    token below them is dropped by top-k when 0 < top_k <= C; by top-p when the candidates
    alone hold more than top_p (the mass above it exceeds top_p); by min-p when even the last
    candidate falls under min_p * the highest (every token below it is no more likely)."""
    device = probs.device
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype)
    by_top_k = (top_k > 0) & (top_k <= probs.shape[1])
    by_top_p = probs.sum(dim=-1) > top_p
    by_min_p = probs[:, -1] < min_p * probs[:, 0]
    return by_top_k | by_top_p | by_min_p


def _filter_sorted(
    sorted_logits: torch.Tensor,
    params: list[SamplingParams],
    candidate_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """sorted_logits [R, N], highest first, with the tokens each row's filters drop set to
    -inf. N is the whole vocabulary, or the candidates when `candidate_mass` [R, 1] gives
    their share of the full softmax: then a row without top-k has its probabilities scaled
    by that share, so top-p measures the same mass it would over the whole row (a top-k
    renormalises within the kept tokens either way)."""
    device = sorted_logits.device
    width = sorted_logits.shape[1]
    ranks = torch.arange(width, device=device).unsqueeze(0)
    top_k = torch.tensor([p.top_k for p in params], device=device).unsqueeze(1)
    remove = ranks >= torch.where(top_k > 0, top_k, width)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    if candidate_mass is not None:
        sorted_probs = sorted_probs * torch.where(top_k > 0, 1.0, candidate_mass)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    remove |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    remove |= sorted_probs < min_p * sorted_probs[:, :1]
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


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
