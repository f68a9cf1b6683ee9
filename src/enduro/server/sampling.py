"""Request fields → one ChoiceSpec (engine request) per prompt and choice."""

from collections.abc import Callable
from dataclasses import dataclass

from enduro.sampling_params import SamplingParams
from enduro.server.context import ServerContext
from enduro.server.errors import invalid
from enduro.server.generation import ChoiceSpec
from enduro.server.prompts import Prompt
from enduro.server.protocol import MAX_SEED, SamplingFields


@dataclass(frozen=True)
class EngineOptions:
    """What differs between completions and chat for the engine."""

    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()


MaxTokensFor = Callable[[Prompt], int]


def check_n(context: ServerContext, body: SamplingFields, num_prompts: int) -> None:
    """Caps known before tokenizing: `n` and how many engine requests the body asks for."""
    max_n = context.config.max_n
    if body.n > max_n:
        raise invalid(f"n must be at most {max_n}", "n")
    context.admission.check_fits(num_prompts * body.n, 0)


def choice_specs(
    context: ServerContext,
    request_id: str,
    body: SamplingFields,
    prompts: list[Prompt],
    max_tokens_for: MaxTokensFor,
    options: EngineOptions,
) -> list[ChoiceSpec]:
    """Choice `p * n + i` is choice i of prompt p, as in OpenAI's batched completions."""
    engine_ids = iter(context.engine_request_ids(request_id, len(prompts) * body.n))
    specs: list[ChoiceSpec] = []
    for prompt in prompts:
        max_tokens = max_tokens_for(prompt)
        for i in range(body.n):
            params = sampling_params(body, max(max_tokens, 1), i, options)
            specs.append(ChoiceSpec(len(specs), next(engine_ids), prompt, params, max_tokens == 0))
    return specs


def sampling_params(
    body: SamplingFields, max_tokens: int, choice: int, options: EngineOptions
) -> SamplingParams:
    # Choice i of a seeded request uses seed + i: the choices differ, yet each is reproducible.
    seed = None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=options.stop_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=options.logprobs,
            prompt_logprobs=options.prompt_logprobs,
        )
    except ValueError as exc:  # our own messages, naming the field and its range
        raise invalid(str(exc)) from None
