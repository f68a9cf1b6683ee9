import math

import pytest
import torch

from enduro.runner.sampler import (
    RequestState,
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
    token_logprobs,
)
from enduro.sampling_params import SamplingParams


def _states(sampler: Sampler, *params: SamplingParams) -> list[RequestState]:
    return [sampler.new_state(p, [0, 1]) for p in params]


def test_greedy_takes_the_argmax() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    tokens, logprobs = sampler.sample(
        logits, _states(sampler, *[SamplingParams(temperature=0)] * 2)
    )
    assert tokens == [1, 0]
    assert logprobs == [None, None]


def test_seeded_sampling_ignores_the_rest_of_the_batch() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    torch.manual_seed(1)
    row = torch.randn(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = [sampler.sample(row, _states(sampler, seeded))[0][0] for _ in range(1)]
    mixed_batch = torch.cat([torch.randn(3, 50), row])
    states = _states(sampler, SamplingParams(), SamplingParams(seed=7), SamplingParams(), seeded)
    mixed = sampler.sample(mixed_batch, states)[0][3]
    assert mixed == alone[0]
    # The same seeded state keeps drawing a reproducible sequence.
    first = _states(sampler, seeded)[0]
    second = _states(sampler, seeded)[0]
    draws_a = [sampler.sample(row, [first])[0][0] for _ in range(5)]
    draws_b = [sampler.sample(row, [second])[0][0] for _ in range(5)]
    assert draws_a == draws_b


def test_random_samples_follow_the_distribution_and_skip_masked_tokens() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log().expand(20_000, -1)  # zeros become -inf: never drawable
    states = _states(sampler, *[SamplingParams(temperature=1.0)] * 20_000)
    tokens, _ = sampler.sample(logits, states)
    counts = torch.bincount(torch.tensor(tokens), minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    # 20,000 draws: one standard deviation of a share is at most 0.0035.
    torch.testing.assert_close(counts.float() / 20_000, probs, atol=0.012, rtol=0)
    # top_k=1 leaves one token, however the uniform falls.
    top1 = _states(sampler, *[SamplingParams(temperature=1.0, top_k=1)] * 50)
    assert sampler.sample(logits[:50], top1)[0] == [0] * 50


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=0, device=torch.device("cpu"))

    def kept(params: SamplingParams) -> list[int]:
        masked = apply_top_k_top_p_min_p(logits, _states(sampler, params))
        return [i for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]

    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.7)) == [0, 1]  # 0.5 < 0.7, 0.5 + 0.3 covers it
    assert kept(SamplingParams(top_p=0.45)) == [0]
    assert kept(SamplingParams(min_p=0.2)) == [0, 1, 2]  # 0.05 < 0.2 * 0.5
    assert kept(SamplingParams()) == [0, 1, 2, 3]


def test_penalties() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    state = sampler.new_state(
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), [0]
    )
    state.output_token_ids.extend([1, 2, 2])
    out = apply_penalties(logits, [state])[0].tolist()
    # token 0: prompt only → repetition: 2 / 2 = 1
    # token 1: output once → -2 * 2 - 0.5 - 0.25
    # token 2: output twice → 1 / 2 - 1.0 - 0.25
    assert out == pytest.approx([1.0, -4.75, -0.75, 1.0])


def test_logprobs_are_raw_with_rank_and_top() -> None:
    logprobs = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0]), dim=-1)
    result = token_logprobs(logprobs, 2, 2)
    assert result.token_id == 2
    assert result.rank == 2
    assert result.top_token_ids == [1, 2]
    assert math.isclose(result.logprob, logprobs[2].item())
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = SamplingParams(temperature=0, logprobs=1, repetition_penalty=1.5)
    tokens, lps = sampler.sample(torch.tensor([[1.0, 3.0, 2.0]]), _states(sampler, params))
    assert lps[0] is not None
    assert math.isclose(lps[0].logprob, logprobs[tokens[0]].item())
