"""One engine child process: spawn it, talk to it over its socket, watch it exit.

The child is `python -m enduro.engine.loop` connected by a socketpair; messages are framed
msgpack (server/ipc.py). EngineClient (engine_client.py) owns one at a time and replaces it
after a crash.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from enduro.config import EngineConfig
from enduro.outputs import EngineCoreOutput
from enduro.server.ipc import (
    CommandResult,
    EngineCommand,
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

STDERR_TAIL_CHARS = 8192
# Seconds a crashed engine has to finish exiting after its socket closed, before SIGKILL.
EXIT_GRACE = 2.0

log = logging.getLogger("enduro.server")


class EngineStartError(RuntimeError):
    """The engine process exited or timed out before it was ready."""


class EngineCommandError(RuntimeError):
    """An engine command failed: refused, timed out, or the engine went away."""


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
        self._command_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks = [
            asyncio.create_task(self._read(reader)),
            asyncio.create_task(self._pump_stderr()),
        ]

    @classmethod
    async def spawn(
        cls,
        config: EngineConfig,
        on_outputs: Callable[[list[EngineCoreOutput]], None],
        log_format: str = "text",
        trace_memory: bool = False,
        env: dict[str, str] | None = None,
    ) -> "EngineProcess":
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "enduro.engine.loop", "--fd", str(child_sock.fileno())),
                *("--parent-pid", str(os.getpid()), "--config", encode_config(config)),
                *("--log-format", log_format),
                *(["--tracemalloc"] if trace_memory else []),
                pass_fds=(child_sock.fileno(),),
                env=env,
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

    async def command(self, name: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run an engine command (engine/commands.py) and return its result map."""
        if not self.alive:
            raise EngineCommandError("the engine is not running")
        command_id = next(self._command_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            self.send(EngineCommand(command_id, name, json.dumps(args)))
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise EngineCommandError(f"{name}: no answer within {timeout:.0f} s") from None
        finally:
            self._pending.pop(command_id, None)

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
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(EngineCommandError("the engine went away"))

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
        elif isinstance(message, CommandResult):
            self._resolve(message)
        elif isinstance(message, Ready) and not self.ready.done():
            self.ready.set_result(message.model_info)
            self.last_heartbeat = self.last_progress = now
        elif isinstance(message, ErrorReport):
            # Its stderr, passed through, already holds the whole traceback.
            self.error = message.message
            log.error(
                "engine %d failed: %s",
                self.pid,
                self.error_summary,
                extra={"event": "engine_error", "engine_pid": self.pid},
            )
        else:
            log.warning("ignored a %s message from the engine", type(message).__name__)

    def _resolve(self, message: CommandResult) -> None:
        future = self._pending.get(message.command_id)
        if future is None or future.done():  # timed out meanwhile
            return
        result = json.loads(message.result_json)
        if message.ok:
            future.set_result(result)
        else:
            future.set_exception(EngineCommandError(str(result.get("error"))))

    async def _pump_stderr(self) -> None:
        """Pass the engine's stderr through to ours (load progress, logs), keeping a tail."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            text = chunk.decode(errors="replace")
            self.stderr_tail = (self.stderr_tail + text)[-STDERR_TAIL_CHARS:]
            sys.stderr.write(text)
            sys.stderr.flush()
