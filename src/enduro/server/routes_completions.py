"""POST /v1/completions: text or token-id prompts, batches, echo and legacy logprobs."""

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from enduro.observability.request_record import record_of
from enduro.server.context import Context, ServerContext
from enduro.server.generation import ChoiceDelta, ChoiceStreams
from enduro.server.logprobs import extend, legacy_logprobs, legacy_prompt_logprobs
from enduro.server.middleware import request_id_of
from enduro.server.prompts import Prompt, completion_prompts, resolve_max_tokens
from enduro.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from enduro.server.routes_common import generation_responses
from enduro.server.sampling import EngineOptions, check_n, choice_specs
from enduro.server.streaming import respond

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=generation_responses(CompletionResponse),
    summary="Continue prompts (OpenAI legacy completions); `stream: true` answers with SSE.",
)
async def create_completion(
    body: CompletionRequest, request: Request, context: Context
) -> Response | BaseModel:
    request_id = request_id_of(request.scope)
    record = record_of(request.scope)
    record.describe_generation(
        model=body.model or context.served_model_name,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        response_id=f"cmpl-{request_id}",
        stream=body.stream,
    )
    context.check_model(body.model)
    context.check_accepting(request)
    context.admission.check_room()
    check_n(context, body, _num_prompts(body.prompt))
    prompts = await completion_prompts(context, body.prompt)
    record.prompt_texts = [prompt.text for prompt in prompts]
    scoring = body.echo  # OpenAI allows max_tokens=0 with echo: score the prompt only

    def max_tokens_for(prompt: Prompt) -> int:
        return resolve_max_tokens(context, prompt, body.max_tokens, allow_zero=scoring)

    options = EngineOptions(
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
    )
    specs = choice_specs(context, request_id, body, prompts, max_tokens_for, options)
    prompt_of = [spec.prompt for spec in specs]
    formatter = CompletionFormatter(context, body, f"cmpl-{request_id}", prompts, prompt_of)
    # Nothing may fail between admission and ChoiceStreams, which owns the slots from then on.
    slots = context.admission.admit([len(spec.prompt.token_ids) for spec in specs])
    streams = ChoiceStreams(specs, slots, context.engine, context.tokenizer, record)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, streams, formatter, body.stream, include_usage)


def _num_prompts(prompt: object) -> int:
    if isinstance(prompt, str) or not isinstance(prompt, list):
        return 1
    return 1 if all(isinstance(p, int) for p in prompt) else len(prompt)


class CompletionFormatter:
    """Deltas → streamed chunks, and the merged response when not streaming."""

    def __init__(
        self,
        context: ServerContext,
        body: CompletionRequest,
        response_id: str,
        prompts: list[Prompt],
        prompt_of: list[Prompt],
    ) -> None:
        self.context = context
        self.body = body
        self.response_id = response_id
        self.created = int(time.time())
        self.prompt_of = prompt_of  # by choice index
        self.num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        self.num_completion_tokens = 0
        self.choices = [CompletionChoice(index=i, text="") for i in range(len(prompt_of))]
        # The echoed prompt's text per choice: its own words, or the decoded token ids.
        self.echo_texts = [self._echo_text(p) for p in prompt_of] if body.echo else None

    def _echo_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.context.tokenizer.decode(prompt.token_ids)

    def chunk(self, delta: ChoiceDelta) -> BaseModel | None:
        self.num_completion_tokens += len(delta.token_ids)
        piece = self._piece(delta)
        self._merge(piece)
        if not (piece.text or piece.finish_reason or (piece.logprobs and piece.logprobs.tokens)):
            return None  # e.g. the first byte of a multi-byte character: nothing to show yet
        return CompletionResponse(
            id=self.response_id, created=self.created, model=self._model(), choices=[piece]
        )

    def _piece(self, delta: ChoiceDelta) -> CompletionChoice:
        echo = self.echo_texts[delta.index] if self.echo_texts is not None else None
        text = (echo or "") + delta.text if delta.is_first else delta.text
        logprobs = self._logprobs(delta, echo) if self.body.logprobs is not None else None
        return CompletionChoice(
            index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason
        )

    def _logprobs(self, delta: ChoiceDelta, echo: str | None) -> CompletionLogprobs:
        token_text = self.context.token_text
        base = len(echo) if echo is not None else 0
        generated = legacy_logprobs(delta.logprobs, delta.token_offsets, base, token_text)
        if echo is None or not delta.is_first:
            return generated
        prompt_ids = self.prompt_of[delta.index].token_ids
        tokenizer = self.context.tokenizer
        prompt = legacy_prompt_logprobs(prompt_ids, delta.prompt_logprobs, tokenizer, token_text)
        return extend(prompt, generated)

    def _merge(self, piece: CompletionChoice) -> None:
        if self.body.stream:
            return  # nothing to accumulate: each piece has gone out as it came
        choice = self.choices[piece.index]
        choice.text += piece.text
        choice.finish_reason = piece.finish_reason
        if piece.logprobs is None:
            return
        if choice.logprobs is None:
            choice.logprobs = piece.logprobs
            return
        merged, new = choice.logprobs, piece.logprobs
        merged.tokens.extend(new.tokens)
        merged.token_logprobs.extend(new.token_logprobs)
        merged.top_logprobs.extend(new.top_logprobs)
        merged.text_offset.extend(new.text_offset)

    def _model(self) -> str:
        return self.context.served_model_name

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
        )

    def usage_chunk(self) -> BaseModel:
        return CompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self._model(),
            choices=[],
            usage=self.usage(),
        )

    def response(self) -> BaseModel:
        return CompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self._model(),
            choices=self.choices,
            usage=self.usage(),
        )
