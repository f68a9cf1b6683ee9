"""The API process's side of the engine: an async client and the supervisor of its process.

The engine runs in a child process (engine/loop.py) connected by a socketpair; messages are
framed msgpack (server/ipc.py). Each generate() owns an asyncio.Queue that the socket reader
fills with its request's outputs. If the child dies, every in-flight generate() raises
EngineDeadError and the supervisor starts a new engine.
"""

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from enduro.config import EngineConfig
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.ipc import (
    AbortRequests,
    AddRequest,
    EngineStats,
    ErrorReport,
    Heartbeat,
    Message,
    ModelInfo,
    ProtocolError,
    Ready,
    Shutdown,
    StepOutputs,
    decode_message,
    encode_config,
    pack_frame,
    read_frame,
)

__all__ = ["EngineClient", "EngineDeadError", "EngineStartError", "EngineStats", "ModelInfo"]

STDERR_TAIL_CHARS = 8192
# Seconds a crashed engine has to finish exiting after its socket closed, before SIGKILL.
EXIT_GRACE = 2.0
MAX_RESTART_BACKOFF = 30.0

log = logging.getLogger("enduro.server")


class EngineDeadError(RuntimeError):
    """The engine died (or was shut down) with this request in flight, or there is no
    running engine to take a new one (starting, restarting, shut down)."""


class EngineStartError(RuntimeError):
    """The engine process exited or timed out before it was ready."""


class EngineProcess:
    """One engine child process and its socket. The client replaces it after a crash."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_outputs: Callable[[list[EngineCoreOutput]], None],
    ) -> None:
        self.proc = proc
        self.writer = writer
        self.on_outputs = on_outputs
        self.ready: asyncio.Future[ModelInfo] = asyncio.get_running_loop().create_future()
        self.stats: EngineStats | None = None
        self.error: str | None = None  # the engine's last ErrorReport
        self.stderr_tail = ""
        self.last_heartbeat = time.monotonic()
        # Local time of the latest sign of progress: a step, or an idle engine.
        self.last_progress = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._read(reader)),
            asyncio.create_task(self._pump_stderr()),
        ]

    @classmethod
    async def spawn(
        cls, config: EngineConfig, on_outputs: Callable[[list[EngineCoreOutput]], None]
    ) -> "EngineProcess":
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "enduro.engine.loop", "--fd", str(child_sock.fileno())),
                *("--parent-pid", str(os.getpid()), "--config", encode_config(config)),
                pass_fds=(child_sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Out of the terminal's process group: Ctrl-C reaches only the API process,
                # which then shuts the engine down in order.
                process_group=0,
            )
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        return cls(proc, reader, writer, on_outputs)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self._tasks[0].done()

    def send(self, message: Message) -> None:
        # Synchronous (buffered by the transport), so an abort can be sent from a `finally`
        # of a cancelled or garbage-collected generator.
        if self.alive and not self.writer.is_closing():
            self.writer.write(pack_frame(message))

    async def wait_ready(self, timeout: float) -> ModelInfo:
        exited = asyncio.ensure_future(self.proc.wait())
        waiters: list[asyncio.Future[Any]] = [self.ready, exited]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise EngineStartError(f"the engine was not ready within {timeout:.0f} s") from None
        finally:
            exited.cancel()
        if self.ready.done():
            return self.ready.result()
        await self._finish_tasks(EXIT_GRACE)  # the whole stderr tail, then the message
        reason = self.error or self.stderr_tail or "(no output)"
        raise EngineStartError(
            f"the engine exited with status {self.proc.returncode} before it was ready:\n{reason}"
        )

    async def wait_gone(self) -> None:
        """Return once the engine is gone: its socket closed or its process exited."""
        exited = asyncio.ensure_future(self.proc.wait())
        await asyncio.wait({self._tasks[0], exited}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()

    @property
    def error_summary(self) -> str | None:
        """The last line of the engine's traceback: the exception itself."""
        lines = self.error.strip().splitlines() if self.error else []
        return lines[-1] if lines else None

    def describe_exit(self) -> str:
        status = "still exiting" if self.proc.returncode is None else self.proc.returncode
        summary = self.error_summary
        return f"status {status}" + (f": {summary}" if summary else "")

    async def stop(self, timeout: float, ask: bool = True) -> None:
        """Ask the engine to exit (or not), SIGKILL it after `timeout`, and reap it."""
        if ask:
            self.send(Shutdown())
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            if timeout > 0:
                log.warning("engine %d still running after %.1f s; killing it", self.pid, timeout)
        self.kill()
        await self.proc.wait()
        self.writer.close()
        await self._finish_tasks(EXIT_GRACE)

    def kill(self) -> None:
        if self.proc.returncode is None:
            # It may exit between the check and the signal.
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def _finish_tasks(self, timeout: float) -> None:
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                self._dispatch(decode_message(frame))
        except ProtocolError as e:
            # A garbled stream cannot be trusted for any request: start over.
            log.error("bad stream from engine %d (%s); killing it", self.pid, e)
            self.kill()
        except OSError as e:  # the engine is gone; the supervisor takes it from here
            log.info("lost the socket to engine %d: %s", self.pid, e)

    def _dispatch(self, message: Message) -> None:
        now = time.monotonic()
        if isinstance(message, StepOutputs):
            self.last_progress = now
            self.on_outputs(message.outputs)
        elif isinstance(message, Heartbeat):
            stats, previous = message.stats, self.stats
            stepped = previous is None or stats.num_steps != previous.num_steps
            if stepped or not (stats.num_running or stats.num_waiting):
                self.last_progress = now
            self.stats, self.last_heartbeat = stats, now
        elif isinstance(message, Ready) and not self.ready.done():
            self.ready.set_result(message.model_info)
            self.last_heartbeat = self.last_progress = now
        elif isinstance(message, ErrorReport):
            # Its stderr, passed through, already holds the whole traceback.
            self.error = message.message
            log.error("engine %d failed: %s", self.pid, self.error_summary)
        else:
            log.warning("ignored a %s message from the engine", type(message).__name__)

    async def _pump_stderr(self) -> None:
        """Pass the engine's stderr through to ours (load progress, logs), keeping a tail."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            text = chunk.decode(errors="replace")
            self.stderr_tail = (self.stderr_tail + text)[-STDERR_TAIL_CHARS:]
            sys.stderr.write(text)
            sys.stderr.flush()


class EngineClient:
    """Start, talk to and supervise the engine process. Use from one event loop."""

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        startup_timeout: float = 600.0,
        stall_timeout: float = 30.0,
    ) -> None:
        self.engine_config = engine_config
        self.startup_timeout = startup_timeout
        self.stall_timeout = stall_timeout
        self._engine: EngineProcess | None = None  # set only while a ready engine serves
        self._model_info: ModelInfo | None = None
        self._queues: dict[str, asyncio.Queue[EngineCoreOutput | EngineDeadError]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._num_restarts = 0
        self._closing = False

    async def start(self) -> None:
        """Spawn the engine and wait until it is loaded and warm (EngineStartError if not)."""
        if self._supervisor is not None or self._closing:
            raise RuntimeError("EngineClient.start() may be called once")
        self._engine = await self._launch()
        self._supervisor = asyncio.create_task(self._supervise())

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineCoreOutput]:
        """This request's outputs, the last with a finish_reason. Stopping early (break,
        cancellation) aborts the request in the engine, which frees its blocks at once."""
        engine = self._require_engine()
        if request_id in self._queues:
            raise ValueError(f"request {request_id!r} is already in flight")
        queue: asyncio.Queue[EngineCoreOutput | EngineDeadError] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            engine.send(AddRequest(request_id, list(prompt_token_ids), params))
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineDeadError):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            del self._queues[request_id]
            if not finished:
                engine.send(AbortRequests([request_id]))

    async def abort(self, request_ids: list[str]) -> None:
        """Stop requests; their generate() ends with a FinishReason.ABORT output."""
        if self._engine is not None:
            self._engine.send(AbortRequests(list(request_ids)))
        for request_id in request_ids:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(EngineCoreOutput(request_id, finish_reason=FinishReason.ABORT))

    @property
    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise RuntimeError("the engine has not started")
        return self._model_info

    @property
    def is_ready(self) -> bool:
        """Loaded and warmed, not restarting, not shut down."""
        return self._engine is not None and self._engine.alive and not self._closing

    @property
    def is_healthy(self) -> bool:
        """Ready, heartbeats arriving, and steps advancing whenever there is work."""
        engine = self._engine
        if engine is None or not engine.alive or self._closing:
            return False
        now = time.monotonic()
        if now - engine.last_heartbeat > self.stall_timeout:
            return False  # the loop is stuck, inside a step or out of one
        stats = engine.stats
        pending = bool(self._queues) or (
            stats is not None and stats.num_running + stats.num_waiting > 0
        )
        return not pending or now - engine.last_progress <= self.stall_timeout

    @property
    def num_restarts(self) -> int:
        return self._num_restarts

    @property
    def stats(self) -> EngineStats | None:
        return self._engine.stats if self._engine is not None else None

    @property
    def pid(self) -> int | None:
        return self._engine.pid if self._engine is not None else None

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine to exit, kill it after `timeout`; no child process is left."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()  # a restart in progress kills its half-started engine
            await asyncio.gather(self._supervisor, return_exceptions=True)
        engine, self._engine = self._engine, None
        self._fail_in_flight("the engine was shut down")
        if engine is not None:
            await engine.stop(timeout)

    # ---- internals --------------------------------------------------------------------------

    def _require_engine(self) -> EngineProcess:
        engine = self._engine
        if engine is None or not engine.alive or self._closing:
            raise EngineDeadError("the engine is not running (starting, restarting or shut down)")
        return engine

    def _route(self, outputs: list[EngineCoreOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:  # else aborted by the client: drop it
                queue.put_nowait(output)

    def _fail_in_flight(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(reason))

    async def _launch(self) -> EngineProcess:
        engine = await EngineProcess.spawn(self.engine_config, self._route)
        log.info("engine process %d starting", engine.pid)
        try:
            self._model_info = await engine.wait_ready(self.startup_timeout)
        except BaseException:  # failed, timed out or cancelled: leave no child behind
            await engine.stop(0.0, ask=False)
            raise
        return engine

    async def _supervise(self) -> None:
        """Wait for the engine to die; fail its requests and start another, forever."""
        while self._engine is not None:
            engine = self._engine
            await engine.wait_gone()
            self._engine = None
            log.error("engine %d died (%s); restarting it", engine.pid, engine.describe_exit())
            self._fail_in_flight(f"the engine process died ({engine.describe_exit()})")
            await engine.stop(EXIT_GRACE, ask=False)  # reap it, killing it if it lingers
            self._num_restarts += 1
            self._engine = await self._relaunch()

    async def _relaunch(self) -> EngineProcess:
        backoff = 1.0
        while True:
            try:
                return await self._launch()
            except Exception:  # whatever it was, the server needs an engine: keep trying
                log.exception("engine restart failed (retrying in %.0f s)", backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, MAX_RESTART_BACKOFF)
