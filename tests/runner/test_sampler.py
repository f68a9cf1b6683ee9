import math
from typing import Any

import pytest
import torch

from enduro import native
from enduro.runner import sampler as sampler_module
from enduro.runner.sampler import (
    RequestState,
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
    inverse_cdf_draw,
    natively_sampled,
    token_logprobs,
)
from enduro.sampling_params import SamplingParams


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def use_native(request: pytest.FixtureRequest) -> Any:
    """Runs a test with the native sampler and again with the torch path alone."""
    native.use_native(request.param)
    yield request.param
    native.use_native(True)


def _states(sampler: Sampler, *params: SamplingParams) -> list[RequestState]:
    return [sampler.new_state(p, [0, 1]) for p in params]


def test_greedy_takes_the_argmax(use_native: bool) -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    tokens, logprobs = sampler.sample(
        logits, _states(sampler, *[SamplingParams(temperature=0)] * 2)
    )
    assert tokens == [1, 0]
    assert logprobs == [None, None]


def test_seeded_sampling_ignores_the_rest_of_the_batch(use_native: bool) -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    torch.manual_seed(1)
    row = torch.randn(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = [sampler.sample(row, _states(sampler, seeded))[0][0] for _ in range(1)]
    mixed_batch = torch.cat([torch.randn(3, 50), row])
    # A row with top-p beside it: with native kernels that row takes the torch path and the
    # others the native one, in the same step.
    others = (SamplingParams(), SamplingParams(seed=7), SamplingParams(top_p=0.9))
    states = _states(sampler, *others, seeded)
    mixed = sampler.sample(mixed_batch, states)[0][3]
    assert mixed == alone[0]
    # The same seeded state keeps drawing a reproducible sequence.
    first = _states(sampler, seeded)[0]
    second = _states(sampler, seeded)[0]
    draws_a = [sampler.sample(row, [first])[0][0] for _ in range(5)]
    draws_b = [sampler.sample(row, [second])[0][0] for _ in range(5)]
    assert draws_a == draws_b


def test_random_samples_follow_the_distribution_and_skip_masked_tokens(use_native: bool) -> None:
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


def test_inverse_cdf_draw_matches_a_whole_row_cumulative_sum() -> None:
    # 1,300 columns: two full blocks of 512 and a padded one; a third of them zero.
    generator = torch.Generator().manual_seed(2)
    probs = torch.rand(8, 1300, generator=generator)
    probs[torch.rand(8, 1300, generator=generator) < 0.33] = 0.0
    probs /= probs.sum(dim=-1, keepdim=True)
    cdf = probs.double().cumsum(dim=-1)
    for _ in range(50):
        uniforms = torch.rand(8, generator=generator, dtype=torch.float64)
        expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True)
        assert torch.equal(inverse_cdf_draw(probs, uniforms), expected.view(-1))


def test_inverse_cdf_draw_never_lands_on_zero_mass() -> None:
    # Mass only in columns 3 and 700; the last block is all zero.
    probs = torch.zeros(3, 1300)
    probs[:, 3], probs[:, 700] = 0.25, 0.75
    lowest = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    assert inverse_cdf_draw(probs, lowest).tolist() == [3, 3, 3]
    # u just under 1 (and u * total rounding up to the total) must still pick column 700.
    highest = torch.tensor([1 - 2**-53, 0.999999, 1.0], dtype=torch.float64)
    assert inverse_cdf_draw(probs, highest).tolist() == [700, 700, 700]
    middle = torch.tensor([0.2499, 0.2501, 0.9], dtype=torch.float64)
    assert inverse_cdf_draw(probs, middle).tolist() == [3, 700, 700]


def native_draws(
    logits: torch.Tensor, temperatures: list[float], uniforms: list[float]
) -> list[int]:
    """`native/sample.c` on logits [R, V] (bf16 or float32) with the given uniforms."""
    library = native.load()
    assert library is not None
    temperature = torch.tensor(temperatures, dtype=torch.float32)
    uniform = torch.tensor(uniforms, dtype=torch.float64)
    tokens = torch.empty(len(temperatures), dtype=torch.int64)
    status = library.sample(
        logits.data_ptr(),
        logits.dtype == torch.bfloat16,
        logits.shape[0],
        logits.shape[1],
        temperature.data_ptr(),
        uniform.data_ptr(),
        tokens.data_ptr(),
    )
    assert status == 0
    return [int(t) for t in tokens]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_native_draw_inverts_the_same_cumulative_sum(dtype: torch.dtype) -> None:
    # 1,300 tokens (two blocks of 512 and a short one), a tenth of them masked with -inf,
    # three temperatures: the native sampler picks the token the torch path picks from
    # softmax(logits / t) with the same uniform.
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 1300, generator=generator) * 3).to(dtype)
    logits[torch.rand(3, 1300, generator=generator) < 0.1] = float("-inf")
    temperatures = [0.7, 1.0, 1.6]
    scaled = logits.float() / torch.tensor(temperatures).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    for _ in range(40):
        uniforms = torch.rand(3, generator=generator, dtype=torch.float64)
        expected = inverse_cdf_draw(probs, uniforms).tolist()
        assert native_draws(logits, temperatures, uniforms.tolist()) == expected
    # Greedy rows (temperature 0): the first of equal largest logits, as torch's argmax.
    ties = torch.zeros(2, 40, dtype=dtype)
    ties[0, [5, 17]] = 2.0
    ties[1, 39] = 1.0
    assert native_draws(ties, [0.0, 0.0], [0.5, 0.5]) == [5, 39]


def test_logits_the_native_sampler_cannot_read_take_the_torch_path() -> None:
    # float16 logits (a float16 model): cast to float32 for the torch path, same tokens.
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    greedy = _states(sampler, *[SamplingParams(temperature=0)] * 2)
    assert sampler.sample(logits.half(), greedy)[0] == [1, 0]


def test_the_native_draw_never_lands_on_a_masked_token() -> None:
    # Weight only in tokens 3 and 700; u at the ends of [0, 1).
    logits = torch.full((4, 1300), float("-inf"))
    logits[:, 3], logits[:, 700] = math.log(0.25), math.log(0.75)
    uniforms = [0.0, 1 - 2**-53, 0.2499, 0.2501]
    assert native_draws(logits, [1.0] * 4, uniforms) == [3, 700, 3, 700]


def test_only_rows_asking_for_a_temperature_alone_are_sampled_natively() -> None:
    assert natively_sampled(SamplingParams())
    assert natively_sampled(SamplingParams(temperature=0.0, seed=3, max_tokens=5))
    assert not natively_sampled(SamplingParams(logprobs=2))
    assert not natively_sampled(SamplingParams(top_p=0.9))
    assert not natively_sampled(SamplingParams(top_k=5))
    assert not natively_sampled(SamplingParams(min_p=0.1))
    assert not natively_sampled(SamplingParams(presence_penalty=0.5))


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


def test_candidate_filtering_equals_the_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 candidates out of 300 tokens; rows whose kept set reaches past them (a flat row with
    # top-p 0.99, min-p with a long tail) take the full sort, the others the candidates. The
    # result must be the same tokens with the same logits either way.
    monkeypatch.setattr(sampler_module, "CANDIDATES", 24)
    generator = torch.Generator().manual_seed(5)
    peaked = torch.randn(6, 300, generator=generator) * 4
    flat = torch.randn(2, 300, generator=generator) * 0.1
    logits = torch.cat([peaked, flat])
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    settings = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.5, top_k=40),  # top-k above the candidates: they widen to 40
        SamplingParams(min_p=0.05),
        SamplingParams(top_k=7),
        SamplingParams(top_p=0.8, min_p=0.1),
        SamplingParams(),
    ]
    calls = {"sort": 0}
    real_sort = torch.Tensor.sort

    def counting_sort(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("descending"):  # sorting logits (the candidates' ids sort ascending)
            calls["sort"] += 1
        return real_sort(self, *args, **kwargs)

    def full_sort_result(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        with monkeypatch.context() as m:
            m.setattr(sampler_module, "CANDIDATES", 10_000)  # never fewer than the vocabulary
            return apply_top_k_top_p_min_p(rows, _states(sampler, *params))

    monkeypatch.setattr(torch.Tensor, "sort", counting_sort)
    for params in settings:
        batch = [params] * 6
        got = apply_top_k_top_p_min_p(peaked, _states(sampler, *batch))
        expected = full_sort_result(peaked, batch)
        assert torch.equal(got, expected), params
    # Only the reference sorted (once per setting with a filter; no filter returns at once):
    # peaked rows keep fewer tokens than their candidates, so they never fell back.
    assert calls["sort"] == len(settings) - 1
    # A flat row with top-p 0.99 needs nearly the whole vocabulary: the full sort.
    calls["sort"] = 0
    flat_params = [SamplingParams(top_p=0.99)] * 8
    got = apply_top_k_top_p_min_p(logits, _states(sampler, *flat_params))
    assert calls["sort"] == 1
    assert torch.equal(got, full_sort_result(logits, flat_params))
    kept_flat = (got[6:] != float("-inf")).sum(dim=-1)
    assert bool((kept_flat > 250).all())


def test_a_seeded_draw_does_not_depend_on_the_filter_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Alone, the peaked row is filtered among its candidates; next to a flat top-p 0.99 row
    # the whole batch takes the full sort. A seeded request must draw the same token.
    monkeypatch.setattr(sampler_module, "CANDIDATES", 24)
    generator = torch.Generator().manual_seed(9)
    peaked = torch.randn(1, 300, generator=generator) * 5
    flat = torch.randn(1, 300, generator=generator) * 0.1
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    drawn_alone, drawn_together = [], []
    for seed in range(60):
        nucleus = SamplingParams(top_p=0.95, seed=seed)
        alone = sampler.sample(peaked, _states(sampler, nucleus))[0]
        pair = _states(sampler, nucleus, SamplingParams(top_p=0.99, seed=1))
        together = sampler.sample(torch.cat([peaked, flat]), pair)[0]
        drawn_alone.append(alone[0])
        drawn_together.append(together[0])
    assert drawn_alone == drawn_together
    assert len(set(drawn_alone)) > 3  # a real draw, not one token every time


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
