"""Engine TokenLogprobs → OpenAI's two logprob shapes: the legacy completions one (tokens,
token_logprobs, top_logprobs, text_offset) and the chat one (content: [{token, logprob, bytes,
top_logprobs}])."""

import math
from collections.abc import Callable

from enduro.outputs import TokenLogprobs
from enduro.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from enduro.tokenizer import IncrementalDetokenizer, Tokenizer

# JSON has no -inf; a token the sampler masked out (top-k, min-p) gets OpenAI's floor instead.
MIN_LOGPROB = -9999.0

TokenText = Callable[[int], str]


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _top_dict(lp: TokenLogprobs, token_text: TokenText) -> dict[str, float]:
    """The top alternatives plus the chosen token itself, as vLLM and lm-eval expect. Tokens
    that read the same (byte pieces all read "\ufffd") share a key: the likelier one wins."""
    top: dict[str, float] = {}
    for token_id, logprob in zip(lp.top_token_ids, lp.top_logprobs, strict=True):
        top.setdefault(token_text(token_id), finite(logprob))
    top.setdefault(token_text(lp.token_id), finite(lp.logprob))
    return top


def legacy_logprobs(
    logprobs: list[TokenLogprobs], offsets: list[int], base_offset: int, token_text: TokenText
) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[token_text(lp.token_id) for lp in logprobs],
        token_logprobs=[finite(lp.logprob) for lp in logprobs],
        top_logprobs=[_top_dict(lp, token_text) for lp in logprobs],
        text_offset=[base_offset + offset for offset in offsets],
    )


def legacy_prompt_logprobs(
    prompt_ids: list[int],
    prompt_logprobs: list[TokenLogprobs],
    tokenizer: Tokenizer,
    token_text: TokenText,
) -> CompletionLogprobs:
    """The echoed prompt's entries; nothing predicts the first token, so its logprob is null."""
    scored = legacy_logprobs(
        prompt_logprobs, text_offsets(prompt_ids, tokenizer)[1:], 0, token_text
    )
    return CompletionLogprobs(
        tokens=[token_text(prompt_ids[0]), *scored.tokens],
        token_logprobs=[None, *scored.token_logprobs],
        top_logprobs=[None, *scored.top_logprobs],
        text_offset=[0, *scored.text_offset],
    )


def extend(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def text_offsets(token_ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """Character offset where each token's text starts, decoded the way the text is."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    offsets, num_chars = [], 0
    for token_id in token_ids:
        offsets.append(num_chars)
        num_chars += len(detokenizer.add(token_id))
    return offsets


def _top_entry(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    text = token_text(token_id)
    return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode()))


def chat_logprobs(logprobs: list[TokenLogprobs], token_text: TokenText) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        chosen = _top_entry(lp.token_id, lp.logprob, token_text)
        tops = [
            _top_entry(t, v, token_text)
            for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
        ]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
