"""POST /tokenize and /detokenize: the server's own tokenizer and chat template, for clients
that count or build prompts themselves."""

from fastapi import APIRouter

from enduro.server.context import Context
from enduro.server.errors import invalid
from enduro.server.prompts import chat_prompt
from enduro.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from enduro.server.routes_common import MODEL_RESPONSES

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=MODEL_RESPONSES)
async def tokenize(body: TokenizeRequest, context: Context) -> TokenizeResponse:
    """Token ids of `prompt`, or of `messages` rendered with the chat template."""
    context.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt and messages")
    if body.messages is not None:
        token_ids = (await chat_prompt(context, body.messages)).token_ids
    else:
        assert body.prompt is not None
        token_ids = await context.encode(body.prompt, body.add_special_tokens)
    return TokenizeResponse(
        count=len(token_ids), max_model_len=context.context_limit, tokens=token_ids
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=MODEL_RESPONSES)
async def detokenize(body: DetokenizeRequest, context: Context) -> DetokenizeResponse:
    context.check_model(body.model)
    vocab_size = context.model_info.vocab_size
    if any(t >= vocab_size for t in body.tokens):
        raise invalid(f"token ids must be below the vocabulary size {vocab_size}", "tokens")
    return DetokenizeResponse(prompt=context.tokenizer.decode(body.tokens))
