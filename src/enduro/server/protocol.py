"""The HTTP boundary: OpenAI-compatible request and response bodies (pydantic).

Requests are strict (no "1" for 1, no 1.0 for an int, no NaN) and every size a client controls
has a static cap here, so the OpenAPI schema states it and nothing big is built before it is
checked. Limits that depend on the model or the server (context length, vocabulary, `max_n`)
are checked in the routes. Unknown fields are ignored, as OpenAI clients send many we do not use.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from enduro.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_N = 128
MAX_TOKENS = 1 << 20
MAX_PROMPTS = 128
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPT_TOKEN_IDS = 1 << 17
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 64
MAX_NAME_CHARS = 256
MAX_SEED = (1 << 63) - 1


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer, so the API does too; 2.5 (and "2") stay invalid."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# After the bounds, so the JSON schema keeps them (minimum/maximum).
INTEGRAL = BeforeValidator(_integral)
Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=(1 << 31) - 1), INTEGRAL]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)]
PromptText = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None
# Bounds sit inside these types: on a `T | None` field pydantic would check them but leave
# them out of the JSON schema as unknown keywords.
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), INTEGRAL]
MaxTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS), INTEGRAL]
PositiveMaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS), INTEGRAL]
NumChoices = Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL]
TopK = Annotated[int, Field(ge=0, le=1 << 20), INTEGRAL]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class RequestBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """Fields completions and chat share."""

    model: Name | None = Field(None, description="The served model name; omit for the default.")
    n: NumChoices = Field(1, description="Choices per prompt (the server caps it: max_n).")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: TopK = Field(0, description="0 disables top-k.")
    min_p: Probability = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float = Field(1.0, gt=0, le=2, allow_inf_nan=False)
    seed: Seed | None = None
    stop: Stop = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: MaxTokens | None = Field(
        16, description="0 only with echo (scoring the prompt); null = up to the context."
    )
    echo: bool = False
    logprobs: Logprobs | None = None


class TextPart(RequestBody):
    type: Literal["text"]
    text: PromptText


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: PromptText | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = (
        None
    )
    name: Name | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatCompletionRequest(SamplingFields):
    messages: Messages
    max_tokens: PositiveMaxTokens | None = Field(None, description="null = up to the context.")
    max_completion_tokens: PositiveMaxTokens | None = Field(
        None, description="Wins over max_tokens."
    )
    logprobs: bool = False
    top_logprobs: Logprobs | None = None


class TokenizeRequest(RequestBody):
    """Exactly one of `prompt` and `messages`."""

    model: Name | None = None
    prompt: PromptText | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestBody):
    model: Name | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKEN_IDS)]


# Responses -----------------------------------------------------------------------------------

FinishReasonName = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the prompt comes first and its first entry is null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _is_none(value: object) -> bool:
    return value is None


class ChatDelta(BaseModel):
    # Left out when unset, as OpenAI does: the role appears in a choice's first chunk only.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "enduro"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class StatusResponse(BaseModel):
    status: Literal["ok"] = "ok"


class HealthResponse(StatusResponse):
    engine_restarts: int = Field(description="times the engine process died and was restarted")


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the envelope."""
    return {status: {"model": ErrorResponse} for status in statuses}
