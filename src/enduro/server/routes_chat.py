"""POST /v1/chat/completions: messages rendered with the chat template, then generated like
a completion."""

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from enduro.observability.request_record import record_of
from enduro.server.context import Context, ServerContext
from enduro.server.errors import invalid
from enduro.server.generation import ChoiceDelta, ChoiceStreams
from enduro.server.logprobs import chat_logprobs
from enduro.server.middleware import request_id_of
from enduro.server.prompts import Prompt, chat_prompt, resolve_max_tokens
from enduro.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    FinishReasonName,
    Usage,
)
from enduro.server.routes_common import generation_responses
from enduro.server.sampling import EngineOptions, check_n, choice_specs
from enduro.server.streaming import respond

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=generation_responses(ChatCompletionChunk),
    summary="Answer a conversation; `stream: true` answers with SSE chunks.",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, context: Context
) -> Response | BaseModel:
    request_id = request_id_of(request.scope)
    requested = body.max_completion_tokens or body.max_tokens  # the newer name wins
    record = record_of(request.scope)
    record.describe_generation(
        model=body.model or context.served_model_name,
        max_tokens=requested,
        temperature=body.temperature,
        top_p=body.top_p,
        response_id=f"chatcmpl-{request_id}",
        stream=body.stream,
    )
    context.check_model(body.model)
    context.check_accepting(request)
    context.admission.check_room()
    check_n(context, body, 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    prompt = await chat_prompt(context, body.messages)
    record.prompt_texts = [prompt.text]

    def max_tokens_for(prompt: Prompt) -> int:
        return resolve_max_tokens(context, prompt, requested)

    options = EngineOptions(
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        stop_token_ids=context.chat_stop_token_ids,
    )
    specs = choice_specs(context, request_id, body, [prompt], max_tokens_for, options)
    formatter = ChatFormatter(context, body, f"chatcmpl-{request_id}", prompt)
    # Nothing may fail between admission and ChoiceStreams, which owns the slots from then on.
    slots = context.admission.admit([len(prompt.token_ids)] * len(specs))
    streams = ChoiceStreams(specs, slots, context.engine, context.tokenizer, record)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, streams, formatter, body.stream, include_usage)


class ChatFormatter:
    """Deltas → `chat.completion.chunk`s, and the merged `chat.completion`."""

    def __init__(
        self, context: ServerContext, body: ChatCompletionRequest, response_id: str, prompt: Prompt
    ) -> None:
        self.context = context
        self.body = body
        self.response_id = response_id
        self.created = int(time.time())
        self.num_prompt_tokens = len(prompt.token_ids)
        self.num_completion_tokens = 0
        self.texts = [""] * body.n
        self.logprobs: list[ChatLogprobs | None] = [
            ChatLogprobs(content=[]) if body.logprobs else None for _ in range(body.n)
        ]
        self.finish_reasons: list[FinishReasonName | None] = [None] * body.n

    def chunk(self, delta: ChoiceDelta) -> BaseModel | None:
        self.num_completion_tokens += len(delta.token_ids)
        logprobs = (
            chat_logprobs(delta.logprobs, self.context.token_text) if self.body.logprobs else None
        )
        if not self.body.stream:
            self._merge(delta, logprobs)
        visible = delta.is_first or delta.text or delta.finish_reason or delta.logprobs
        if not visible:
            return None  # e.g. the first byte of a multi-byte character: nothing to show yet
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(role="assistant" if delta.is_first else None, content=delta.text),
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
        )
        return ChatCompletionChunk(
            id=self.response_id,
            created=self.created,
            model=self.context.served_model_name,
            choices=[choice],
        )

    def _merge(self, delta: ChoiceDelta, logprobs: ChatLogprobs | None) -> None:
        self.texts[delta.index] += delta.text
        self.finish_reasons[delta.index] = delta.finish_reason
        merged = self.logprobs[delta.index]
        if merged is not None and merged.content is not None and logprobs is not None:
            merged.content.extend(logprobs.content or [])

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
        )

    def usage_chunk(self) -> BaseModel:
        return ChatCompletionChunk(
            id=self.response_id,
            created=self.created,
            model=self.context.served_model_name,
            choices=[],
            usage=self.usage(),
        )

    def response(self) -> BaseModel:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=self.texts[i]),
                logprobs=self.logprobs[i],
                finish_reason=self.finish_reasons[i],
            )
            for i in range(self.body.n)
        ]
        return ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.context.served_model_name,
            choices=choices,
            usage=self.usage(),
        )
