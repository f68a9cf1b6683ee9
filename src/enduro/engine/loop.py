"""The engine process: load the model, warm up, then step whenever there is work.

server/engine_client.py starts it as `python -m enduro.engine.loop --fd N --parent-pid P
--config JSON`, with its end of a socketpair inherited as fd N. Only the main thread touches
the engine; a reader thread turns incoming frames into commands on a queue, so the loop
blocks on the queue when idle and drains it between steps when busy. Frames: server/ipc.py.
"""

import argparse
import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from types import FrameType

from enduro.config import LOG_FORMATS, EngineConfig
from enduro.engine.commands import CommandError, EngineCommands
from enduro.engine.engine_core import EngineCore
from enduro.engine.page_purge import PagePurger
from enduro.engine.profiling import PROFILE_REQUEST_PREFIX, StepProfiler
from enduro.engine.step_times import StepTimes
from enduro.engine.warmup import warm_up
from enduro.guard.introspection import HeapBaseline, collect_and_trim
from enduro.observability.logging import configure_logging
from enduro.observability.process_memory import (
    anon_memory_bytes,
    jemalloc_mallctl,
    jemalloc_purge,
    malloc_stats,
    python_heap_bytes,
)
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.ipc import (
    AbortRequests,
    AddRequest,
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
    decode_config,
    decode_message,
    pack_frame,
    read_frame_sync,
)

# The client counts on a heartbeat at least every 0.5 s while the loop is between steps.
HEARTBEAT_INTERVAL = 0.25
# Checking the KV pool's invariants walks every block: often enough to catch a leak early,
# rarely enough to cost nothing.
INVARIANT_CHECK_INTERVAL = 5.0
# Preemptions come in bursts (the pool ran full); one log line sums up each such stretch.
PREEMPTION_LOG_INTERVAL = 10.0

log = logging.getLogger("enduro.engine")


class ParentGone(Exception):
    """The socket to the API process is closed: nobody is left to serve."""


def send_message(sock: socket.socket, message: Message) -> None:
    try:
        sock.sendall(pack_frame(message))
    except OSError as e:
        raise ParentGone from e


class EngineLoop:
    def __init__(self, core: EngineCore, sock: socket.socket, trace_memory: bool = False) -> None:
        self.core = core
        self.sock = sock
        self.commands = EngineCommands(core, HeapBaseline(trace_memory))
        self.profiler: StepProfiler | None = None
        # None marks the end of the incoming stream.
        self.inbox: queue.Queue[Message | None] = queue.Queue()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.last_step_time: float | None = None
        self.step_times = StepTimes()
        self.last_heartbeat = 0.0
        self.busy_at_heartbeat = False
        self.pool_violations: list[str] = []
        self.last_invariant_check = -INVARIANT_CHECK_INTERVAL
        self.num_preemptions_logged = 0
        self.last_preemption_log = -PREEMPTION_LOG_INTERVAL
        self.page_purger = PagePurger(
            jemalloc_purge if jemalloc_mallctl() is not None else None, time.monotonic()
        )

    def run(self) -> int:
        """Serve until told to stop; returns the exit status (non-zero after a failure)."""
        threading.Thread(target=self._read, name="enduro-ipc-reader", daemon=True).start()
        try:
            while self._apply_commands():
                if self.core.has_unfinished_requests():
                    self._step()
                self._maintain()
                self._maybe_heartbeat()
        except ParentGone:
            log.info("the API process is gone; exiting")
        except Exception:
            # The client restarts the engine; the traceback tells it (and the logs) why.
            log.exception("the engine loop failed")
            self._send_quietly(ErrorReport(traceback.format_exc()))
            return 1
        return 0

    def send(self, message: Message) -> None:
        send_message(self.sock, message)

    def _send_quietly(self, message: Message) -> None:
        with contextlib.suppress(ParentGone):
            self.send(message)

    # ---- commands ---------------------------------------------------------------------------

    def _read(self) -> None:
        """Reader thread: frames → commands on the inbox; None once the stream ends."""
        stream = self.sock.makefile("rb")
        try:
            while (frame := read_frame_sync(stream)) is not None:
                try:
                    self.inbox.put(decode_message(frame))
                except ProtocolError as e:  # framing is intact, so skip just this one
                    log.error("dropped a malformed message: %s", e)
        except (OSError, ProtocolError) as e:
            log.error("reading from the API process failed: %s", e)
        finally:
            self.inbox.put(None)

    def _apply_commands(self) -> bool:
        """Apply every pending command, first waiting (until the next heartbeat is due) if
        there is no work. Returns False when the loop should end."""
        try:
            if self.core.has_unfinished_requests():
                message = self.inbox.get_nowait()
            else:
                due = self.last_heartbeat + HEARTBEAT_INTERVAL - time.monotonic()
                message = self.inbox.get(timeout=max(0.0, due))
            while self._apply(message):
                message = self.inbox.get_nowait()
        except queue.Empty:
            return True
        return False

    def _apply(self, message: Message | None) -> bool:
        if message is None or isinstance(message, Shutdown):
            return False
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequests):
            self.core.finish_requests(message.request_ids, FinishReason.ABORT)
        elif isinstance(message, EngineCommand):
            self._command(message)
        else:
            log.warning("ignored a %s message", type(message).__name__)
        return True

    def _add(self, message: AddRequest) -> None:
        try:
            self.core.add_request(message.request_id, message.prompt_token_ids, message.params)
        except ValueError as e:  # a duplicate request id: refuse it, keep serving the rest
            refused = EngineCoreOutput(
                message.request_id, finish_reason=FinishReason.ERROR, error=str(e)
            )
            self.send(StepOutputs([refused]))
            return
        self.num_prompt_tokens += len(message.prompt_token_ids)

    def _command(self, message: EngineCommand) -> None:
        try:
            args = json.loads(message.args_json)
            if not isinstance(args, dict):
                raise CommandError("command arguments must be a JSON object")
            if message.name == "profile":
                self._start_profile(message.command_id, args)
                return
            result = self.commands.run(message.name, args)
        except (CommandError, ValueError) as e:
            self._reply(message.command_id, False, {"error": str(e)})
            return
        self._reply(message.command_id, True, result)

    def _reply(self, command_id: int, ok: bool, result: dict[str, object]) -> None:
        self.send(CommandResult(command_id, ok, json.dumps(result)))

    def _start_profile(self, command_id: int, args: dict[str, object]) -> None:
        if self.profiler is not None:
            raise CommandError("a profile is already running")
        num_steps = int(str(args.get("num_steps", 8)))
        self.profiler = StepProfiler(command_id, num_steps, bool(args.get("trace", False)))
        if not self.core.has_unfinished_requests():  # idle: make steps to profile
            params = SamplingParams(max_tokens=self.profiler.num_steps, temperature=0.0)
            for i in range(4):
                request_id = f"{PROFILE_REQUEST_PREFIX}{command_id}-{i}"
                self.core.add_request(request_id, [1 + i] * 32, params)

    # ---- steps, maintenance and heartbeats --------------------------------------------------

    def _step(self) -> None:
        started = time.perf_counter()
        outputs = self.core.step()
        self.step_times.observe(time.perf_counter() - started)
        self.last_step_time = time.monotonic()
        outputs = [o for o in outputs if not o.request_id.startswith(PROFILE_REQUEST_PREFIX)]
        self.num_generation_tokens += sum(len(output.new_token_ids) for output in outputs)
        if outputs:
            self.send(StepOutputs(outputs))
        if self.profiler is not None and self.profiler.after_step():
            profiler, self.profiler = self.profiler, None
            self._reply(profiler.command_id, True, profiler.finish())

    def _maintain(self) -> None:
        """Compaction and segment release between steps (EngineCore.maintain)."""
        report = self.core.maintain(force=self.commands.force_compaction)
        if self.commands.force_compaction and report.num_moves == 0:
            self.commands.force_compaction = False
        self.page_purger.maybe_purge(time.monotonic(), self.core.has_unfinished_requests())
        if report.released_segments:
            log.info(
                "released %d KV segments (%d blocks moved)",
                len(report.released_segments),
                report.num_moves,
                extra={
                    "event": "kv_segments_released",
                    "segments": report.released_segments,
                    "num_moves": report.num_moves,
                },
            )

    def _maybe_heartbeat(self) -> None:
        """Every HEARTBEAT_INTERVAL, and at once when work starts or ends, so the client
        sees a drained engine (after an abort, say) without waiting."""
        busy = self.core.has_unfinished_requests()
        now = time.monotonic()
        if now - self.last_heartbeat < HEARTBEAT_INTERVAL and busy == self.busy_at_heartbeat:
            return
        stats = self.stats(now)
        self.send(Heartbeat(stats))
        self.last_heartbeat, self.busy_at_heartbeat = now, busy
        self._log_preemptions(stats.num_preemptions, now)

    def _log_preemptions(self, num_preemptions: int, now: float) -> None:
        """At most one line per PREEMPTION_LOG_INTERVAL, counting those since the last."""
        num_new = num_preemptions - self.num_preemptions_logged
        if num_new <= 0 or now - self.last_preemption_log < PREEMPTION_LOG_INTERVAL:
            return
        log.warning(
            "preempted %d running requests since the last report (the KV pool ran full)",
            num_new,
            extra={"event": "preemption_burst", "num_preemptions": num_new},
        )
        self.num_preemptions_logged, self.last_preemption_log = num_preemptions, now

    def _pool_violations(self, now: float) -> list[str]:
        if now - self.last_invariant_check >= INVARIANT_CHECK_INTERVAL:
            self.pool_violations = self.core.kv_cache_manager.check_invariants()
            self.last_invariant_check = now
        return self.pool_violations

    def stats(self, now: float) -> EngineStats:
        scheduler = self.core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        malloc = malloc_stats()
        memory = anon_memory_bytes()
        return EngineStats(
            time=now,
            num_steps=scheduler.stats.num_steps,
            last_step_time=self.last_step_time,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_used_blocks=pool.num_used_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_blocks=pool.num_blocks,
            max_num_blocks=pool.max_num_blocks,
            num_segments=pool.num_segments,
            max_num_segments=pool.layout.max_num_segments,
            num_segments_grown=pool.num_segments_grown,
            num_segments_released=pool.num_segments_released,
            num_compaction_moves=self.core.num_compaction_moves,
            num_evictions=pool.num_evictions,
            num_preemptions=scheduler.stats.num_preemptions,
            num_prefix_queries=scheduler.stats.num_prefix_queries,
            num_prefix_hits=scheduler.stats.num_prefix_hits,
            num_prompt_tokens=self.num_prompt_tokens,
            num_prefill_tokens=scheduler.stats.num_prefill_tokens,
            num_generation_tokens=self.num_generation_tokens,
            kv_cache_fragmentation=pool.fragmentation,
            kv_cache_bytes=self.core.kv_cache_bytes,
            pool_violations=self._pool_violations(now),
            python_heap_bytes=python_heap_bytes(),
            # The KV pool's reservation is one malloc'd block that counts as allocated whether
            # its pages are committed or not; what changes is everything else.
            malloc_allocated_bytes=(
                max(malloc.allocated_bytes - self.core.kv_host_reserved_bytes, 0)
                if malloc
                else None
            ),
            malloc_held_bytes=malloc.held_bytes if malloc else None,
            num_allocator_purges=self.page_purger.num_purges,
            memory_bytes=memory,
            step_seconds_counts=list(self.step_times.counts),
            step_seconds_sum=self.step_times.sum,
        )


# ---- start-up -------------------------------------------------------------------------------


def model_info(core: EngineCore) -> ModelInfo:
    runner = core.runner
    tokenizer_dir = runner.files.tokenizer_dir
    return ModelInfo(
        source=str(runner.files.source),
        max_model_len=runner.max_model_len,
        vocab_size=runner.arch.vocab_size,
        eos_token_ids=tuple(runner.arch.eos_token_ids),
        tokenizer_dir=str(tokenizer_dir) if tokenizer_dir is not None else None,
        num_blocks=runner.num_blocks,
        block_size=core.config.cache.block_size,
        dtype=str(runner.dtype).removeprefix("torch."),
    )


def _log_progress(stage: str, done: int, total: int) -> None:
    if done == total:
        log.info("%s: %d/%d", stage, done, total)


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the API process. Linux sends PDEATHSIG when the *thread* that forked us
    exits, so the client must spawn from its event-loop thread (it does)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit("the API process is gone")


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    # The API process drives orderly shutdown; a signal here just ends the engine, no traceback.
    raise SystemExit(0)


def _start(sock: socket.socket, config: EngineConfig, trace_memory: bool) -> EngineLoop | None:
    started = time.monotonic()
    try:
        core = EngineCore(config, _log_progress)
        warm_up(core)
        # Loading (dequantization, the prepared-weights cache) frees hundreds of MB that
        # glibc would otherwise keep for the life of the process.
        collect_and_trim()
    except Exception:
        log.exception("the engine failed to start")
        send_message(sock, ErrorReport(traceback.format_exc()))
        return None
    loop = EngineLoop(core, sock, trace_memory)
    loop.send(Ready(model_info(core)))
    seconds = time.monotonic() - started
    runner = core.runner
    log.info(
        "ready in %.1f s (%d matmul shapes built in %.1f s; native kernels %s, "
        "%d of %d layers decode natively)",
        seconds,
        runner.num_warm_up_matmuls,
        runner.warm_up_seconds,
        "on" if runner.native_kernels else "off",
        runner.num_native_layers,
        len(runner.model.layers),
        extra={
            "event": "engine_ready",
            "seconds": seconds,
            "warm_up_matmuls": runner.num_warm_up_matmuls,
            "warm_up_matmul_seconds": runner.warm_up_seconds,
            "native_kernels": runner.native_kernels,
            "native_decode_layers": runner.num_native_layers,
        },
    )
    return loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="enduro engine process (started by the server)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the server")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    configure_logging(args.log_format, role="engine")
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    sock = socket.socket(fileno=args.fd)
    try:
        loop = _start(sock, decode_config(args.config), args.tracemalloc)
    except ParentGone:
        return 0
    return loop.run() if loop is not None else 1


if __name__ == "__main__":
    sys.exit(main())
