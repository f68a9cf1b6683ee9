"""What every route needs, built once by create_app: the engine, tokenizer, limits, names,
telemetry."""

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from enduro.chat_template import ChatTemplate
from enduro.config import ServerConfig
from enduro.guard.service import Guard
from enduro.observability.telemetry import Telemetry
from enduro.outputs import EngineCoreOutput
from enduro.sampling_params import SamplingParams
from enduro.server.admission import Admission
from enduro.server.engine_client import EngineStats, ModelInfo
from enduro.server.errors import APIError, invalid, unavailable
from enduro.tokenizer import Tokenizer

TOKEN_TEXT_CACHE_SIZE = 1 << 16


class Engine(Protocol):
    """The part of EngineClient the routes use (tests pass an in-process engine)."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineCoreOutput]: ...

    async def abort(self, request_ids: list[str]) -> None: ...

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_healthy(self) -> bool: ...

    @property
    def num_restarts(self) -> int: ...

    @property
    def stats(self) -> EngineStats | None:
        """The latest heartbeat; None before the first (or with no engine process)."""

    @property
    def pid(self) -> int | None:
        """The engine process; None while there is none (or it runs in this process)."""

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Run an engine command (engine/commands.py); EngineCommandError if it fails."""

    async def recycle(self, drain_timeout: float = 300.0) -> int:
        """Replace the engine worker without failing a request; the new pid."""


def model_names(model_info: ModelInfo, config: ServerConfig) -> tuple[str, frozenset[str]]:
    """(the name the API reports, every name a request may use): the served name if one is
    configured, and always the model file's or directory's stem."""
    stem = Path(model_info.source).stem
    served = config.served_model_name or stem
    return served, frozenset({served, stem})


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: Tokenizer
    model_info: ModelInfo
    config: ServerConfig
    chat_template: ChatTemplate
    chat_stop_token_ids: tuple[int, ...]  # end-of-turn tokens: a chat reply stops at them
    admission: Admission
    telemetry: Telemetry  # its registry holds every metric: /metrics and the dashboard read it
    guard: Guard
    served_model_name: str
    accepted_model_names: frozenset[str]
    created: int
    # Engine request ids must be unique even when clients reuse an X-Request-Id.
    _serial: "itertools.count[int]" = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.token_text = functools.lru_cache(TOKEN_TEXT_CACHE_SIZE)(self.tokenizer.token_text)

    @property
    def context_limit(self) -> int:
        """Most prompt + output tokens one request may have: the context length, or what
        the KV pool can hold (the last sampled token never needs a slot)."""
        info = self.model_info
        return min(info.max_model_len, info.num_blocks * info.block_size + 1)

    def check_model(self, name: str | None) -> None:
        """Requests may omit `model` (OpenAI requires it; one model is served here anyway)."""
        if name is not None and name not in self.accepted_model_names:
            raise APIError(404, "the model does not exist", param="model", code="model_not_found")

    def check_accepting(self, request: Request) -> None:
        if getattr(request.app.state, "draining", False):
            raise unavailable("the server is shutting down", "draining")
        if not self.engine.is_ready:
            raise unavailable("the model is not ready", "not_ready")

    def check_token_ids(self, token_ids: list[int]) -> None:
        vocab_size = self.model_info.vocab_size
        if any(t >= vocab_size for t in token_ids):
            raise invalid(f"token ids must be below the vocabulary size {vocab_size}", "prompt")

    def engine_request_ids(self, request_id: str, count: int) -> list[str]:
        serial = next(self._serial)
        return [f"{request_id}.{serial}-{i}" for i in range(count)]

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # A thread: a megabyte of text takes the tokenizer long enough to stall other streams.
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)


def get_context(request: Request) -> ServerContext:
    context = request.app.state.context
    assert isinstance(context, ServerContext)
    return context


Context = Annotated[ServerContext, Depends(get_context)]
