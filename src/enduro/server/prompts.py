"""Request prompts → token ids, checked against the vocabulary and the context length before
anything reaches the engine."""

import asyncio
from dataclasses import dataclass

from enduro.chat_template import ChatTemplateError
from enduro.server.context import ServerContext
from enduro.server.errors import invalid
from enduro.server.protocol import MAX_PROMPT_CHARS, ChatMessage


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None  # as the client sent it; None when it sent token ids


CompletionPrompt = str | list[str] | list[int] | list[list[int]]


async def completion_prompts(context: ServerContext, prompt: CompletionPrompt) -> list[Prompt]:
    if isinstance(prompt, str):
        return [await _text_prompt(context, prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [_ids_prompt(context, prompt)]  # type: ignore[arg-type]
    prompts: list[Prompt] = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append(await _text_prompt(context, item))
        else:
            prompts.append(_ids_prompt(context, item))  # type: ignore[arg-type]
    return prompts


async def chat_prompt(context: ServerContext, messages: list[ChatMessage]) -> Prompt:
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = await asyncio.to_thread(context.chat_template.render, plain)
    except ChatTemplateError as exc:
        raise invalid(str(exc), "messages") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise invalid(f"the rendered chat must be at most {MAX_PROMPT_CHARS} characters")
    # The template writes the special tokens (bos) itself, as transformers does.
    token_ids = await context.encode(text, add_special_tokens=False)
    return _checked(Prompt(token_ids, text), "messages")


async def _text_prompt(context: ServerContext, text: str) -> Prompt:
    return _checked(Prompt(await context.encode(text), text), "prompt")


def _ids_prompt(context: ServerContext, token_ids: list[int]) -> Prompt:
    context.check_token_ids(token_ids)
    return _checked(Prompt(list(token_ids), None), "prompt")


def _checked(prompt: Prompt, param: str) -> Prompt:
    if not prompt.token_ids:
        raise invalid("the prompt is empty", param)
    return prompt


def resolve_max_tokens(
    context: ServerContext, prompt: Prompt, requested: int | None, *, allow_zero: bool = False
) -> int:
    """New tokens to generate for this prompt; None = up to the context length. 0 is allowed
    only for echo scoring (the engine still generates one token, which is dropped)."""
    limit = context.context_limit
    num_prompt = len(prompt.token_ids)
    if requested == 0 and not allow_zero:
        raise invalid("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    if requested is None:
        if num_prompt >= limit:
            raise invalid(f"the prompt ({num_prompt} tokens) fills the context ({limit})")
        return limit - num_prompt
    if num_prompt + max(requested, 1) > limit:
        raise invalid(
            f"prompt ({num_prompt} tokens) + max_tokens ({requested}) exceeds the context "
            f"length ({limit})",
            "max_tokens",
        )
    return requested
