"""Offline generation: `LLM(model).generate(prompts, params)`."""

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from enduro.config import EngineConfig
from enduro.engine.engine_core import EngineCore
from enduro.engine.output_processor import OutputProcessor
from enduro.outputs import RequestOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """An engine in this process. Keyword arguments are the fields of ModelConfig,
    CacheConfig and SchedulerConfig (dtype, max_model_len, block_size, num_blocks, ...)."""

    def __init__(
        self,
        model: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.engine = EngineCore(self.config, progress)
        tokenizer_dir = self.engine.runner.files.tokenizer_dir
        self.tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion, all batched together."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_params_list(params, len(prompt_list))
        request_ids = [
            self.add_request(p, sp) for p, sp in zip(prompt_list, param_list, strict=True)
        ]
        while self.engine.has_unfinished_requests():
            self.step()
        return [self.processor.pop(rid) for rid in request_ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated."""
        request_id = self.add_request(prompt, params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                delta = self.step().get(request_id, "")
                if delta:
                    yield delta
        finally:
            self.abort([request_id])
            self.processor.trackers.pop(request_id, None)

    def add_request(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self.processor.add_request(request_id, text, token_ids, params)
        self.engine.add_request(request_id, token_ids, params)
        return request_id

    def step(self) -> dict[str, str]:
        """One engine step; returns the visible text delta per request."""
        deltas, stopped = self.processor.process(self.engine.step())
        self.engine.finish_requests(stopped, FinishReason.STOP)
        return deltas

    def abort(self, request_ids: list[str]) -> None:
        self.engine.finish_requests(request_ids, FinishReason.ABORT)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} prompts")
    return list(params)
