"""The API process's side of the engine: an async client and the supervisor of its process.

The engine runs in a child process (engine/loop.py) connected by a socketpair; messages are
framed msgpack (server/ipc.py). Each generate() owns an asyncio.Queue that the socket reader
fills with its request's outputs. If the child dies, every generate() in flight on it raises
EngineDeadError and the supervisor starts a new engine.

recycle() replaces a healthy engine without failing a request: it starts the new worker
while the old one serves, sends new requests to the new one, lets the old one finish what
it has, then stops it. For a while two engines run; each request stays with the one that
took it.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from enduro.config import EngineConfig
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.allocator import engine_environment
from enduro.server.engine_process import (
    EXIT_GRACE,
    EngineCommandError,
    EngineProcess,
    EngineStartError,
)
from enduro.server.ipc import (
    AbortRequests,
    AddRequest,
    EngineStats,
    ModelInfo,
)

__all__ = [
    "EngineClient",
    "EngineCommandError",
    "EngineDeadError",
    "EngineStartError",
    "EngineStats",
    "ModelInfo",
]

MAX_RESTART_BACKOFF = 30.0
COMMAND_TIMEOUT = 60.0

log = logging.getLogger("enduro.server")


class EngineDeadError(RuntimeError):
    """The engine died (or was shut down) with this request in flight, or there is no
    running engine to take a new one (starting, restarting, shut down)."""


class EngineClient:
    """Start, talk to and supervise the engine process. Use from one event loop."""

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        startup_timeout: float = 600.0,
        stall_timeout: float = 30.0,
        log_format: str = "text",
        trace_memory: bool = False,
        allocator: str = "auto",
    ) -> None:
        self.engine_config = engine_config
        self.log_format = log_format  # the engine process logs as the server does
        self.trace_memory = trace_memory
        self.engine_env = engine_environment(allocator)  # checked now, not at the first spawn
        self.startup_timeout = startup_timeout
        self.stall_timeout = stall_timeout
        self._engine: EngineProcess | None = None  # set only while a ready engine serves
        self._model_info: ModelInfo | None = None
        self._queues: dict[str, asyncio.Queue[EngineCoreOutput | EngineDeadError]] = {}
        self._owners: dict[str, EngineProcess] = {}  # the engine serving each request
        self._supervisor: asyncio.Task[None] | None = None
        self._num_restarts = 0
        self._num_recycles = 0
        self._recycling = False
        self._retiring: set[EngineProcess] = set()  # recycled, still draining
        self._closing = False
        # Faults armed through /debug/faults stay armed in replacement engines: a recycle
        # fixes the state a defect built up, not the defect.
        self._faults: dict[str, Any] | None = None

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
        self._owners[request_id] = engine
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
            del self._owners[request_id]
            if not finished:
                engine.send(AbortRequests([request_id]))

    async def abort(self, request_ids: list[str]) -> None:
        """Stop requests; their generate() ends with a FinishReason.ABORT output."""
        for request_id in request_ids:
            owner = self._owners.get(request_id)
            if owner is not None:
                owner.send(AbortRequests([request_id]))
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
    def num_recycles(self) -> int:
        return self._num_recycles

    async def command(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> dict[str, Any]:
        """Run an engine command (engine/commands.py) on the engine serving new requests."""
        if name == "faults":
            self._faults = dict(args or {})
        return await self._require_engine().command(name, args or {}, timeout)

    async def recycle(self, drain_timeout: float = 300.0) -> int:
        """Replace the engine with a fresh one and no failed request; returns the new pid.

        The new worker loads and warms up while the old one serves; then new requests go to
        the new one, the old one finishes its requests (aborted after `drain_timeout`), and
        is stopped."""
        if self._recycling or self._closing:
            raise EngineCommandError("a recycle is already running, or the server is closing")
        old = self._require_engine()
        self._recycling = True
        try:
            new = await self._launch()
            if self._engine is not old:  # the old one died meanwhile and was replaced
                await new.stop(EXIT_GRACE)
                raise EngineCommandError("the engine was restarted during the recycle")
            self._swap(new)
            await self._drain(old, drain_timeout)
            self._num_recycles += 1
            return new.pid
        finally:
            self._recycling = False

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
        for retiring in [engine, *self._retiring]:
            if retiring is not None:
                await retiring.stop(timeout)

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

    def _fail_in_flight(self, reason: str, engine: EngineProcess | None = None) -> None:
        """Fail the requests in flight on `engine` (on every engine when None)."""
        for request_id, queue in self._queues.items():
            if engine is None or self._owners.get(request_id) is engine:
                queue.put_nowait(EngineDeadError(reason))

    def _swap(self, new: EngineProcess) -> None:
        """Send new requests to `new`, and supervise it instead of the current engine."""
        self._engine = new
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _drain(self, old: EngineProcess, timeout: float) -> None:
        self._retiring.add(old)
        try:
            await self._drain_requests(old, timeout)
        finally:
            await old.stop(EXIT_GRACE)
            self._retiring.discard(old)

    async def _drain_requests(self, old: EngineProcess, timeout: float) -> None:
        log.info(
            "engine %d draining (recycled)",
            old.pid,
            extra={"event": "engine_recycle", "engine_pid": old.pid},
        )
        deadline = time.monotonic() + timeout
        while old.alive and time.monotonic() < deadline and self._requests_on(old):
            await asyncio.sleep(0.05)
        left = self._requests_on(old)
        if left and old.alive:
            log.warning("engine %d still had %d requests after the drain", old.pid, len(left))
            self._fail_in_flight("the engine was recycled", old)
        elif not old.alive:
            self._fail_in_flight(f"the engine process died ({old.describe_exit()})", old)

    def _requests_on(self, engine: EngineProcess) -> list[str]:
        return [rid for rid, owner in self._owners.items() if owner is engine]

    async def _launch(self) -> EngineProcess:
        engine = await EngineProcess.spawn(
            self.engine_config, self._route, self.log_format, self.trace_memory, self.engine_env
        )
        log.info(
            "engine process %d starting",
            engine.pid,
            extra={"event": "engine_start", "engine_pid": engine.pid},
        )
        try:
            self._model_info = await engine.wait_ready(self.startup_timeout)
            if self._faults is not None:
                await engine.command("faults", self._faults, COMMAND_TIMEOUT)
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
            log.error(
                "engine %d died (%s); restarting it",
                engine.pid,
                engine.describe_exit(),
                extra={
                    "event": "engine_restart",
                    "engine_pid": engine.pid,
                    "exit_status": engine.proc.returncode,
                    "num_restarts": self._num_restarts + 1,
                },
            )
            self._fail_in_flight(f"the engine process died ({engine.describe_exit()})", engine)
            await engine.stop(EXIT_GRACE, ask=False)  # reap it, killing it if it lingers
            self._num_restarts += 1
            self._engine = await self._relaunch()

    async def _relaunch(self) -> EngineProcess:
        backoff = 1.0
        while True:
            try:
                return await self._launch()
            except Exception:  # whatever it was, the server needs an engine: keep trying
                log.exception(
                    "engine restart failed (retrying in %.0f s)",
                    backoff,
                    extra={"event": "engine_error"},
                )
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, MAX_RESTART_BACKOFF)
