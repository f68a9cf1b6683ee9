"""EngineClient against a real engine process on a tiny model: same tokens as offline,
concurrency, client-side aborts, crash and restart, shutdown, and no orphaned children."""

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import pytest_asyncio

from enduro import LLM
from enduro.config import CacheConfig, EngineConfig, SchedulerConfig
from enduro.core.scheduler import Scheduler
from enduro.engine.engine_core import MaintenanceReport
from enduro.engine.faults import Faults
from enduro.engine.loop import EngineLoop
from enduro.engine.page_purge import IDLE_PURGE_AFTER
from enduro.outputs import EngineCoreOutput
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineStartError,
    ModelInfo,
)
from enduro.server.ipc import (
    HEADER,
    AbortRequests,
    AddRequest,
    CommandResult,
    EngineCommand,
    ErrorReport,
    Heartbeat,
    Message,
    Shutdown,
    StepOutputs,
    decode_message,
    encode_message,
    pack_frame,
    read_frame_sync,
)

# The async tests share one event loop, and the `client` fixture's engine, per module.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

# 512 blocks of 4 tokens hold a whole 1,024-token context, so LONG runs ~1,000 steps: it is
# still running whenever a test acts on it after its first output.
OPTIONS: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_blocks": 512}
STARTUP_TIMEOUT = 60.0
PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 7]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
LONG = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)


def engine_config(path: Path) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(path), **OPTIONS)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return LLM(str(model_dir), **OPTIONS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(model_dir: Path) -> AsyncIterator[EngineClient]:
    client = EngineClient(engine_config(model_dir), startup_timeout=STARTUP_TIMEOUT)
    await client.start()
    yield client
    await client.shutdown()


async def collect(
    client: EngineClient,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    arrivals: list[str] | None = None,
) -> list[EngineCoreOutput]:
    outputs = []
    async for output in client.generate(request_id, prompt, params):
        outputs.append(output)
        if arrivals is not None:
            arrivals.append(request_id)
    return outputs


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def process_exists(pid: int) -> bool:
    """True while the process runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@on_module_loop
async def test_generate_matches_offline_llm(client: EngineClient, offline: LLM) -> None:
    (expected,) = offline.generate([PROMPT], GREEDY)
    async with asyncio.timeout(10):
        outputs = await collect(client, "greedy", PROMPT, GREEDY)
    assert [t for o in outputs for t in o.new_token_ids] == expected.outputs[0].token_ids
    assert len(expected.outputs[0].token_ids) == 16
    # Exact: float logprobs and their top-2 alternatives cross the socket bit for bit.
    assert [lp for o in outputs for lp in o.new_logprobs] == expected.outputs[0].logprobs
    assert [o.finish_reason for o in outputs] == [None] * 15 + [FinishReason.LENGTH]
    source = str(offline.engine.runner.files.source)
    assert client.model_info == ModelInfo(
        source=source,
        max_model_len=1024,
        vocab_size=512,
        eos_token_ids=(2,),
        tokenizer_dir=source,
        num_blocks=512,
        block_size=4,
        dtype="float32",
    )


@on_module_loop
async def test_concurrent_generates_interleave(client: EngineClient, offline: LLM) -> None:
    prompts = [PROMPT, [300, 12, 6], [*range(40, 70)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 20, 8, 16)
    ]
    expected = offline.generate(prompts, params)
    arrivals: list[str] = []
    async with asyncio.timeout(20):
        results = await asyncio.gather(
            *(
                collect(client, f"c{i}", p, sp, arrivals)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
            )
        )
    for outputs, reference in zip(results, expected, strict=True):
        assert [t for o in outputs for t in o.new_token_ids] == reference.outputs[0].token_ids
        assert outputs[-1].finish_reason is FinishReason.LENGTH
    # One request after another would switch ids 3 times; batched steps switch every step.
    switches = sum(a != b for a, b in itertools.pairwise(arrivals))
    assert switches >= 20


@on_module_loop
@pytest.mark.parametrize("how", ["cancel", "break"])
async def test_stopping_a_consumer_aborts_in_engine(client: EngineClient, how: str) -> None:
    async with asyncio.timeout(10):
        await wait_until(lambda: client.stats is not None and client.stats.num_running == 0, 2)
        before = client.stats
        assert before is not None
        first_output, stop = asyncio.Event(), asyncio.Event()

        async def consume() -> None:
            # "cancel": the task is cancelled while it awaits the next output, as a request
            # handler is when its client disconnects. "break": the dropped generator is closed.
            async for _ in client.generate(f"stop-{how}", [*range(100, 140)], LONG):
                first_output.set()
                if how == "break":
                    await stop.wait()
                    break

        task = asyncio.create_task(consume())
        await first_output.wait()
        # The engine heartbeats as soon as work starts: wait for the running request to show.
        await wait_until(lambda: client.stats is not None and client.stats.num_running == 1, 1)
        running = client.stats
        assert running is not None and running.num_used_blocks > before.num_used_blocks
        if how == "cancel":
            task.cancel()
        stop.set()
        stopped_at = time.monotonic()
        await asyncio.gather(task, return_exceptions=True)
        await wait_until(
            lambda: (
                client.stats is not None
                and client.stats.time > running.time  # a heartbeat sent after the stop
                and client.stats.num_running == 0
                and client.stats.num_used_blocks == before.num_used_blocks
            ),
            timeout=1.0,
        )
    assert time.monotonic() - stopped_at < 1.0
    after = client.stats
    assert after is not None and after.num_waiting == 0
    # Aborted, not finished: LONG alone would have generated 984 tokens.
    assert after.num_generation_tokens - before.num_generation_tokens < 984


@on_module_loop
async def test_malformed_frames_do_not_crash_the_engine(client: EngineClient) -> None:
    pid, engine = client.pid, client._engine  # the raw socket, to send what no client would
    assert engine is not None
    garbage = [b"\xc1", encode_message(AbortRequests(["x"])).replace(b"abort", b"abxrt")]
    for body in garbage:
        engine.writer.write(HEADER.pack(len(body)) + body)
    engine.writer.write(pack_frame(AbortRequests(["nobody"])))  # unknown ids are ignored
    async with asyncio.timeout(10):
        outputs = await collect(client, "after-garbage", PROMPT, GREEDY)
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert (client.pid, client.num_restarts, client.is_healthy) == (pid, 0, True)


@on_module_loop
async def test_stall_is_unhealthy_and_kill_9_restarts(model_dir: Path, offline: LLM) -> None:
    config = engine_config(model_dir)
    client = EngineClient(config, startup_timeout=STARTUP_TIMEOUT, stall_timeout=1.0)
    try:
        async with asyncio.timeout(2 * STARTUP_TIMEOUT):
            await client.start()
            first_pid = client.pid
            assert first_pid is not None and client.is_healthy
            # The default allocator: jemalloc, installed by the project's setup.
            assert "libjemalloc.so" in Path(f"/proc/{first_pid}/maps").read_text()
            # Stalled: alive (no restart) but no heartbeats, so not healthy until it resumes.
            os.kill(first_pid, signal.SIGSTOP)
            await wait_until(lambda: not client.is_healthy, 3.0)
            assert client.is_ready and client.num_restarts == 0
            os.kill(first_pid, signal.SIGCONT)
            await wait_until(lambda: client.is_healthy, 3.0)
            # Killed mid-request: the request fails, a new engine takes over.
            doomed = client.generate("doomed", PROMPT, LONG)
            await anext(doomed)
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="died"):
                async for _ in doomed:
                    pass
            assert not client.is_ready and not client.is_healthy
            with pytest.raises(EngineDeadError, match="not running"):
                await anext(client.generate("too-soon", PROMPT, GREEDY))
            await wait_until(lambda: client.is_healthy, STARTUP_TIMEOUT)
            assert client.num_restarts == 1 and client.is_ready
            assert client.pid not in (None, first_pid) and not process_exists(first_pid)
            assert "libjemalloc.so" in Path(f"/proc/{client.pid}/maps").read_text()
            outputs = await collect(client, "after", PROMPT, GREEDY)
            # Idle since: the engine hands its kept pages back once (engine/page_purge.py).
            await wait_until(
                lambda: (stats := client.stats) is not None and stats.num_allocator_purges == 1,
                IDLE_PURGE_AFTER + 3.0,
            )
        (expected,) = offline.generate([PROMPT], GREEDY)
        assert [t for o in outputs for t in o.new_token_ids] == expected.outputs[0].token_ids
    finally:
        await client.shutdown()


@on_module_loop
async def test_shutdown_leaves_no_child(model_dir: Path) -> None:
    client = EngineClient(engine_config(model_dir), startup_timeout=STARTUP_TIMEOUT)
    async with asyncio.timeout(STARTUP_TIMEOUT + 20):
        await client.start()
        pid = client.pid
        assert pid is not None and process_exists(pid)
        in_flight = client.generate("in-flight", PROMPT, LONG)
        await anext(in_flight)
        await client.shutdown(timeout=10)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in in_flight:
                pass
    assert not process_exists(pid)
    assert (client.pid, client.is_ready, client.is_healthy, client.num_restarts) == (
        None,
        False,
        False,
        0,
    )


@on_module_loop
async def test_engine_start_failure_reports_its_stderr(tmp_path: Path) -> None:
    children = child_pids()
    config = EngineConfig.from_kwargs(model=str(tmp_path / "no-such-model"), dtype="float32")
    client = EngineClient(config, startup_timeout=STARTUP_TIMEOUT)
    async with asyncio.timeout(STARTUP_TIMEOUT):
        with pytest.raises(EngineStartError, match="no-such-model") as failure:
            await client.start()
    assert "exited with status 1 before it was ready" in str(failure.value)
    assert client.pid is None and not client.is_ready
    assert child_pids() == children


@on_module_loop
async def test_engine_start_timeout_leaves_no_child(model_dir: Path) -> None:
    children = child_pids()
    client = EngineClient(engine_config(model_dir), startup_timeout=0.2)  # python alone: ~2 s
    async with asyncio.timeout(10):
        with pytest.raises(EngineStartError, match="not ready within"):
            await client.start()
    assert child_pids() == children


def child_pids() -> set[int]:
    """This process's live children (a not-yet-reaped zombie would count)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


PARENT_SCRIPT = """
import asyncio, sys
from enduro.config import EngineConfig
from enduro.server.engine_client import EngineClient

async def main() -> None:
    client = EngineClient(EngineConfig.from_kwargs(model=sys.argv[1], dtype="float32"))
    await client.start()
    print(client.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@on_module_loop
async def test_engine_does_not_outlive_its_parent(model_dir: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, str(model_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), STARTUP_TIMEOUT)
        engine_pid = int(line)
        assert process_exists(engine_pid)
        parent.kill()  # no shutdown, no finally blocks: only the kernel can tell the engine
        parent.wait()
        await wait_until(lambda: not process_exists(engine_pid), 5.0)
    finally:
        parent.kill()
        parent.wait()


# ---- the engine loop in this process, over a socketpair, with a stand-in engine core ----------


class StubCore:
    """Enough of EngineCore for EngineLoop: a real (pure Python) scheduler for the stats, and
    a step that gives each request 3 tokens, then finishes it — or raises."""

    def __init__(self, fail: bool = False) -> None:
        self.scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 16, 64)
        self.num_tokens: dict[str, int] = {}
        self.fail = fail
        self.kv_cache_bytes = 16 * 4096
        self.kv_host_reserved_bytes = 64 * 4096
        self.kv_cache_manager = self.scheduler.kv_cache_manager
        self.num_compaction_moves = 0
        self.faults = Faults()

    def maintain(self, force: bool = False) -> MaintenanceReport:
        return MaintenanceReport(0, [])

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.num_tokens:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.num_tokens[request_id] = 0

    def finish_requests(self, request_ids: list[str], reason: FinishReason) -> None:
        for request_id in request_ids:
            self.num_tokens.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.num_tokens)

    def step(self) -> list[EngineCoreOutput]:
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(0.005)  # a step takes time: commands sent together arrive mid-request
        self.scheduler.stats.num_steps += 1
        outputs = []
        for request_id in list(self.num_tokens):
            self.num_tokens[request_id] += 1
            done = self.num_tokens[request_id] == 3
            reason = FinishReason.LENGTH if done else None
            outputs.append(EngineCoreOutput(request_id, new_token_ids=[7], finish_reason=reason))
            if done:
                del self.num_tokens[request_id]
        return outputs


def run_loop(core: StubCore) -> tuple[socket.socket, BinaryIO, threading.Thread, list[int]]:
    """Start EngineLoop on one end of a socketpair; returns the other end and its reader."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5.0)
    loop = EngineLoop(core, theirs)  # type: ignore[arg-type]
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(loop.run()), daemon=True)
    thread.start()
    return ours, ours.makefile("rb"), thread, status


def test_loop_answers_engine_commands_between_steps() -> None:
    sock, stream, thread, status = run_loop(StubCore())
    sock.sendall(pack_frame(EngineCommand(1, "collect", "{}")))
    sock.sendall(pack_frame(EngineCommand(2, "no-such-command", "{}")))
    sock.sendall(pack_frame(EngineCommand(3, "faults", '{"leak_blocks_per_request": -1}')))
    results = [next_message(stream, CommandResult) for _ in range(3)]
    assert all(isinstance(r, CommandResult) for r in results)
    first, second, third = (r for r in results if isinstance(r, CommandResult))
    assert (first.command_id, first.ok) == (1, True)
    assert set(json.loads(first.result_json)) == {
        "gc_collected",
        "malloc_trim_released",
        "jemalloc_purged",
        "memory_before",
        "memory_after",
    }
    assert (second.command_id, second.ok) == (2, False)
    assert json.loads(second.result_json) == {"error": "unknown engine command 'no-such-command'"}
    assert (third.command_id, third.ok) == (3, False)
    assert "fault sizes must be >= 0" in json.loads(third.result_json)["error"]
    sock.sendall(pack_frame(Shutdown()))
    thread.join(5)
    assert status == [0]


def next_message(stream: BinaryIO, kind: type[Message]) -> Message:
    """The next message of `kind`, skipping others (heartbeats arrive in between)."""
    while True:
        frame = read_frame_sync(stream)
        assert frame is not None
        message = decode_message(frame)
        if isinstance(message, kind):
            return message


def test_loop_reports_a_failed_step_then_exits_non_zero() -> None:
    sock, stream, thread, status = run_loop(StubCore(fail=True))
    sock.sendall(pack_frame(AddRequest("r", [1, 2], GREEDY)))
    report = next_message(stream, ErrorReport)
    assert isinstance(report, ErrorReport) and "RuntimeError: boom" in report.message
    thread.join(5.0)
    assert status == [1]


def test_loop_serves_heartbeats_and_exits_on_eof() -> None:
    sock, stream, thread, status = run_loop(StubCore())
    started = time.monotonic()
    beats = [next_message(stream, Heartbeat) for _ in range(3)]
    # Idle: a heartbeat every 0.25 s, not a busy loop sending (and stepping) nonstop.
    assert 0.4 < time.monotonic() - started < 10.0  # generous: CI machines are loaded
    assert all(isinstance(b, Heartbeat) and b.stats.num_steps == 0 for b in beats)
    # One write, so the duplicate arrives while the first is in flight: refused, the first
    # goes on.
    sock.sendall(
        pack_frame(AddRequest("r", [1, 2], GREEDY)) + pack_frame(AddRequest("r", [3], GREEDY))
    )
    outputs: list[EngineCoreOutput] = []
    while len(outputs) < 4:
        message = next_message(stream, StepOutputs)
        assert isinstance(message, StepOutputs)
        outputs += message.outputs
    refused = EngineCoreOutput(
        "r", finish_reason=FinishReason.ERROR, error="duplicate request id 'r'"
    )
    assert refused in outputs
    outputs.remove(refused)
    assert [(o.new_token_ids, o.finish_reason) for o in outputs] == [
        ([7], None),
        ([7], None),
        ([7], FinishReason.LENGTH),
    ]
    sock.shutdown(socket.SHUT_WR)  # EOF: the API process is gone
    thread.join(5.0)
    assert status == [0]
