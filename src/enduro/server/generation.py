"""Engine outputs → per-choice text deltas: incremental detokenization, stop strings, logprobs.

Each choice (one engine request) runs as a task feeding one queue, so a request with n choices
or several prompts streams them interleaved as they are produced. Closing the stream (client
gone, error, stop string) cancels the tasks, and a cancelled engine generate() aborts its
request in the engine, which frees its KV blocks.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from enduro.observability.request_record import RequestRecord
from enduro.outputs import EngineCoreOutput, TokenLogprobs
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.admission import WaitSlot
from enduro.server.context import Engine
from enduro.server.engine_client import EngineDeadError
from enduro.server.errors import invalid, unavailable
from enduro.server.prompts import Prompt
from enduro.server.protocol import FinishReasonName
from enduro.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    engine_request_id: str
    prompt: Prompt
    params: SamplingParams
    # max_tokens=0 scoring: the engine needs max_tokens >= 1, so one token is generated and
    # dropped; the choice reports the prompt only.
    drop_output: bool = False


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Character offset of each new token in the choice's text (before any stop-string cut).
    token_offsets: list[int] = field(default_factory=list)
    # All of the prompt's logprobs, in the choice's first delta only.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReasonName | None = None
    is_first: bool = False


_FINISH_NAMES: dict[FinishReason, FinishReasonName] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}


def finish_name(output: EngineCoreOutput) -> FinishReasonName:
    """OpenAI's finish_reason for an engine finish; errors and aborts become API errors."""
    reason = output.finish_reason
    if reason is FinishReason.ERROR:
        raise invalid(output.error or "the engine rejected the request")
    if reason is FinishReason.ABORT:
        raise unavailable("the request was aborted by the server", "aborted")
    assert reason is not None
    return _FINISH_NAMES[reason]


class ChoiceDecoder:
    """One choice's running text: engine outputs in, visible deltas out."""

    def __init__(self, spec: ChoiceSpec, tokenizer: Tokenizer) -> None:
        self.spec = spec
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(spec.params.stop, spec.params.include_stop_str_in_output)
        self.num_chars = 0  # detokenized characters so far, stop strings not cut
        self.prompt_logprobs: list[TokenLogprobs] = []
        self.num_deltas = 0

    def add(self, output: EngineCoreOutput) -> ChoiceDelta | None:
        """The delta to show for this output, or None while only prompt logprobs arrive
        (they are held until the first token, so they go out together, in order)."""
        self.prompt_logprobs.extend(output.new_prompt_logprobs)
        if not output.new_token_ids and output.finish_reason is None:
            return None
        delta = ChoiceDelta(self.spec.index, is_first=self.num_deltas == 0)
        self.num_deltas += 1
        if delta.is_first:
            delta.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, []
        if self.spec.drop_output:
            delta.finish_reason = "length" if output.finish_reason is not None else None
            return delta
        self._add_tokens(delta, output)
        if self.matcher.stopped:
            delta.finish_reason = "stop"
        elif output.finish_reason is not None:
            delta.finish_reason = finish_name(output)
            delta.text += self.matcher.flush()
        return delta

    def _add_tokens(self, delta: ChoiceDelta, output: EngineCoreOutput) -> None:
        delta.token_ids = list(output.new_token_ids)
        delta.logprobs = list(output.new_logprobs)
        text = ""
        for token_id in output.new_token_ids:
            delta.token_offsets.append(self.num_chars)
            piece = self.detokenizer.add(token_id)
            self.num_chars += len(piece)
            text += piece
        delta.text = self.matcher.add(text)


def _note_output(
    record: RequestRecord, spec: ChoiceSpec, slot: WaitSlot, output: EngineCoreOutput
) -> None:
    if output.first_scheduled_time is not None:
        record.note_scheduled(output.first_scheduled_time - slot.admitted_at)
    if output.new_token_ids:
        record.note_tokens(spec.index, time.monotonic())


async def run_choice(
    spec: ChoiceSpec, engine: Engine, tokenizer: Tokenizer, slot: WaitSlot, record: RequestRecord
) -> AsyncIterator[ChoiceDelta]:
    decoder = ChoiceDecoder(spec, tokenizer)
    outputs = engine.generate(spec.engine_request_id, spec.prompt.token_ids, spec.params)
    try:
        async for output in outputs:
            slot.release()  # no longer waiting once the engine has produced something
            _note_output(record, spec, slot, output)
            delta = decoder.add(output)
            if delta is None:
                continue
            if delta.finish_reason is not None:
                record.note_finish(spec.index, delta.finish_reason)
            yield delta
            if delta.finish_reason is not None:
                return
    except EngineDeadError:
        raise unavailable("the engine restarted; retry the request", "engine_unavailable") from None
    finally:
        slot.release()
        # Leaving early (stop string, cancellation) closes generate() now, which aborts the
        # engine request, rather than whenever the garbage collector finalizes it.
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


_DONE = object()


class ChoiceStreams:
    """The deltas of several choices, interleaved in arrival order. Use `async with`."""

    def __init__(
        self,
        specs: list[ChoiceSpec],
        slots: list[WaitSlot],
        engine: Engine,
        tokenizer: Tokenizer,
        record: RequestRecord,
    ) -> None:
        self._queue: asyncio.Queue[ChoiceDelta | BaseException | object] = asyncio.Queue()
        self._slots = slots
        self._tasks = [
            asyncio.create_task(self._pump(run_choice(spec, engine, tokenizer, slot, record)))
            for spec, slot in zip(specs, slots, strict=True)
        ]

    async def _pump(self, deltas: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async for delta in deltas:
                self._queue.put_nowait(delta)
        except Exception as exc:  # handed to the consumer, which raises it
            self._queue.put_nowait(exc)
        self._queue.put_nowait(_DONE)

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        num_running = len(self._tasks)
        while num_running:
            item = await self._queue.get()
            if item is _DONE:
                num_running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, ChoiceDelta)
                yield item

    async def __aenter__(self) -> "ChoiceStreams":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A task cancelled before it ran never reached run_choice's `finally`.
        for slot in self._slots:
            slot.release()
