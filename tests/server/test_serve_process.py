"""`enduro serve` as a real process: startup, SIGTERM drain, engine crash and restart."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from enduro import LLM, SamplingParams


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "enduro.cli", "serve", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "server exited during startup"
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not become ready")

    def engine_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def tiny_server(tiny_model_dir: Callable[[str], Path]) -> Iterator[ServerProcess]:
    server = ServerProcess(
        "--model",
        str(tiny_model_dir("llama")),
        "--dtype",
        "float32",
        "--block-size",
        "4",
        "--num-blocks",
        "256",
        "--shutdown-timeout",
        "20",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_server: ServerProcess) -> None:
    engine_pids = tiny_server.engine_pids()
    assert engine_pids
    results: list[tuple[str | None, int]] = []

    def run() -> None:
        stream = tiny_server.client().completions.create(
            model=tiny_server.client().models.list().data[0].id,
            prompt="Hello world",
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        tokens = 0
        finish = None
        for chunk in stream:
            tokens += 1
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        results.append((finish, tokens))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    tiny_server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert tiny_server.process.wait(60) == 0
    assert [finish for finish, _ in results] == ["length"] * 3
    assert all(
        not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        for pid in engine_pids
    )


def test_engine_kill_is_followed_by_restart(tiny_server: ServerProcess) -> None:
    (engine_pid,) = tiny_server.engine_pids()
    os.kill(engine_pid, signal.SIGKILL)
    assert wait_until(lambda: status(f"{tiny_server.url}/health") == 503, 10)
    assert wait_until(lambda: status(f"{tiny_server.url}/health") == 200, 120)
    assert httpx.get(f"{tiny_server.url}/health").json()["engine_restarts"] == 1
    assert wait_until(lambda: status(f"{tiny_server.url}/ready") == 200, 120)
    client = tiny_server.client()
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=5)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert tiny_server.engine_pids() != [engine_pid]


@pytest.mark.slow
def test_default_model_server_matches_offline_engine() -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    offline = LLM(None, dtype="float32").generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    server = ServerProcess("--dtype", "float32")
    try:
        server.wait_ready()
        client = server.client()
        model = client.models.list().data[0].id
        for prompt, expected in zip(prompts, offline, strict=True):
            completion = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=16,
                temperature=0,
                logprobs=0,
                extra_body={"ignore_eos": True},
            )
            choice = completion.choices[0]
            assert choice.text == expected.outputs[0].text
            assert choice.logprobs is not None and choice.logprobs.tokens is not None
            assert len(choice.logprobs.tokens) == len(expected.outputs[0].token_ids)
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == len(expected.prompt_token_ids)
    finally:
        server.stop()
