"""Test doubles for the API: an EngineClient over a real EngineCore stepping in a thread, and
a real uvicorn server on a free loopback port.

The engine client has EngineClient's interface (generate / abort / model_info / is_ready /
is_healthy / num_restarts / stats), so API tests run real tokens from a tiny model without the
engine process and its IPC, plus knobs to make it unready, unhealthy, slow, or die mid-stream.
"""

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from enduro.config import EngineConfig, GuardConfig, ServerConfig
from enduro.engine.commands import CommandError, EngineCommands
from enduro.engine.engine_core import EngineCore
from enduro.guard.introspection import HeapBaseline
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.app import create_app
from enduro.server.engine_client import (
    EngineCommandError,
    EngineDeadError,
    EngineStats,
    ModelInfo,
)
from enduro.tokenizer import Tokenizer

Item = EngineCoreOutput | EngineDeadError


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Item]"


@dataclass
class _Call:
    name: str
    args: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: "asyncio.Future[dict[str, Any]]"


@dataclass
class _Commands:
    adds: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)


class InProcessEngineClient:
    """EngineClient's interface over an EngineCore in this process, stepped by a thread."""

    def __init__(self, config: EngineConfig, step_delay: float = 0.0) -> None:
        # One torch thread: beside the event loop, uvicorn and the test on 2 cores, a second
        # intra-op thread makes a tiny model's step 20-40x slower (spin-waiting). Restored by
        # close().
        self._previous_num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.core = EngineCore(config)
        self.engine_commands = EngineCommands(self.core, HeapBaseline(trace=False))
        runner = self.core.runner
        tokenizer_dir = runner.files.tokenizer_dir
        self.model_info = ModelInfo(
            source=str(runner.files.source),
            max_model_len=runner.max_model_len,
            vocab_size=runner.arch.vocab_size,
            eos_token_ids=tuple(runner.arch.eos_token_ids),
            tokenizer_dir=str(tokenizer_dir) if tokenizer_dir is not None else None,
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            dtype=str(runner.dtype).removeprefix("torch."),
        )
        self.is_ready = True
        self.is_healthy = True
        self.num_restarts = 0
        self.stats: EngineStats | None = None  # no heartbeats: tests set it to what they need
        self.pid: int | None = None  # no engine process
        self.step_delay = step_delay  # seconds slept after each step: makes requests "long"
        self.die_after_outputs: int | None = None  # then every request gets EngineDeadError
        self.aborted: list[str] = []
        self.added: list[tuple[str, list[int], SamplingParams]] = []
        self._sinks: dict[str, _Sink] = {}
        self._commands = _Commands()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineCoreOutput]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        with self._lock:
            if request_id in self._sinks:
                raise ValueError(f"request {request_id!r} is already in flight")
            self._sinks[request_id] = _Sink(asyncio.get_running_loop(), queue)
            self._commands.adds.append((request_id, list(prompt_token_ids), params))
            self.added.append((request_id, list(prompt_token_ids), params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineDeadError):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            with self._lock:
                del self._sinks[request_id]
            if not finished:
                await self.abort([request_id])

    async def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            self._commands.aborts.extend(request_ids)
            self.aborted.extend(request_ids)
        self._wakeup.set()

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Run an engine command between two steps of the engine thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        with self._lock:
            self._commands.calls.append(_Call(name, dict(args or {}), loop, future))
        self._wakeup.set()
        async with asyncio.timeout(timeout):
            return await future

    async def recycle(self, drain_timeout: float = 300.0) -> int:
        raise EngineCommandError("an in-process engine cannot be recycled")

    @property
    def num_unfinished(self) -> int:
        """Requests the engine still holds (read from another thread: a snapshot)."""
        return len(self.core.scheduler.requests)

    @property
    def num_used_blocks(self) -> int:
        return self.core.scheduler.kv_cache_manager.block_pool.num_used_blocks

    def close(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=10)
        torch.set_num_threads(self._previous_num_threads)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.core.has_unfinished_requests():
                if self._wakeup.wait(0.02):
                    self._wakeup.clear()
                continue
            outputs = self.core.step()
            if self.step_delay:
                time.sleep(self.step_delay)
            self._deliver(outputs)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, _Commands()
        for request_id, token_ids, params in commands.adds:
            self.core.add_request(request_id, token_ids, params)
        if commands.aborts:
            self.core.finish_requests(commands.aborts, FinishReason.ABORT)
        for call in commands.calls:
            self._answer(call)
        self.core.maintain(force=self.engine_commands.force_compaction)

    def _answer(self, call: _Call) -> None:
        def settle(result: dict[str, Any] | None, error: Exception | None) -> None:
            if call.future.done():
                return
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result or {})

        try:
            result, error = self.engine_commands.run(call.name, call.args), None
        except CommandError as e:
            result, error = None, EngineCommandError(str(e))
        with contextlib.suppress(RuntimeError):  # the test's loop may be gone
            call.loop.call_soon_threadsafe(settle, result, error)

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        with self._lock:
            for output in outputs:
                sink = self._sinks.get(output.request_id)
                if sink is not None:
                    self._put(sink, output)
            if self.die_after_outputs is not None:
                self.die_after_outputs -= len(outputs)
                if self.die_after_outputs <= 0:
                    self._die()

    def _die(self) -> None:
        """Fail every request in flight, as EngineClient does when the process dies."""
        self.die_after_outputs = None
        for request_id, sink in self._sinks.items():
            self._put(sink, EngineDeadError("the engine process died (test)"))
            self._commands.aborts.append(request_id)

    @staticmethod
    def _put(sink: _Sink, item: Item) -> None:
        # The test's event loop may be gone already; its requests no longer matter.
        with contextlib.suppress(RuntimeError):
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serve(
    app: Any, lifespan: Literal["on", "off"] = "off", **uvicorn_options: Any
) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on 127.0.0.1; yields the base URL. The app's
    lifespan (background tasks such as the dashboard sampler) runs only when asked."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, **uvicorn_options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def tiny_engine(
    model_dir: Path, step_delay: float = 0.0, **engine_options: Any
) -> InProcessEngineClient:
    options: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_blocks": 256}
    options.update(engine_options)
    return InProcessEngineClient(
        EngineConfig.from_kwargs(model=str(model_dir), **options), step_delay
    )


def tiny_app(
    engine: InProcessEngineClient,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any | None = None,
    guard_config: GuardConfig | None = None,
    **server_options: Any,
) -> FastAPI:
    """The API over `engine`, serving the model as "tiny"; metrics into `registry` (a new one
    by default), spans to `tracer_provider` (by default none: no OTEL_* variables in tests)."""
    assert engine.model_info.tokenizer_dir is not None
    tokenizer = Tokenizer(Path(engine.model_info.tokenizer_dir))
    options: dict[str, Any] = {"served_model_name": "tiny"}
    options.update(server_options)
    config = ServerConfig(**options)
    return create_app(
        engine,
        tokenizer,
        engine.model_info,
        config,
        registry=registry,
        tracer_provider=tracer_provider,
        guard_config=guard_config,
    )


class ScriptedEngine:
    """An engine that answers every request with the same token ids, one per output: exact
    control over what the detokenizer and stop strings see."""

    def __init__(self, model_info: ModelInfo, token_ids: list[int]) -> None:
        self.model_info = model_info
        self.token_ids = token_ids
        self.is_ready = True
        self.is_healthy = True
        self.num_restarts = 0
        self.stats: EngineStats | None = None
        self.pid: int | None = None
        self.aborted: list[str] = []

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineCoreOutput]:
        script = self.token_ids[: params.max_tokens]
        finished = False
        try:
            for i, token_id in enumerate(script):
                await asyncio.sleep(0)
                finished = i == len(script) - 1
                reason = FinishReason.LENGTH if finished else None
                yield EngineCoreOutput(request_id, [token_id], finish_reason=reason)
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        raise EngineCommandError("a scripted engine runs no commands")

    async def recycle(self, drain_timeout: float = 300.0) -> int:
        raise EngineCommandError("a scripted engine cannot be recycled")

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)
