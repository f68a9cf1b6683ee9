"""The engine's memory outside the KV pool under agent-shaped traffic, without a server.

Drives an in-process engine (default model unless --model) with agent sessions in token ids:
a shared 650-token system prefix, then one screen of 300–500 tokens per step that is cut to a
10-token header at the next step, replies of 60–200 tokens (EOS ignored), 4–30 steps per
session, `--sessions` at once. Every `--every` seconds it records the process's RssAnon +
VmSwap minus the committed KV segments, i.e. what the engine holds besides its KV pool. At the
end it runs gc.collect + malloc_trim(0) and prints how much that gave back: memory a trim
returns was free inside malloc, not held by live objects.

Run it once per allocator setting (each a fresh process), e.g.
  .venv/bin/python benchmarks/engine_memory.py --seconds 300 --csv /tmp/glibc.csv
  MALLOC_ARENA_MAX=2 .venv/bin/python benchmarks/engine_memory.py ...
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
    .venv/bin/python benchmarks/engine_memory.py ...
"""

import argparse
import csv
import ctypes
import random
import sys
import time
from pathlib import Path

from enduro.engine.llm import LLM
from enduro.guard.introspection import collect_and_trim
from enduro.observability.process_memory import anon_memory_bytes
from enduro.sampling_params import SamplingParams

MIB = 1 << 20


class Session:
    def __init__(self, rng: random.Random, prefix: list[int], vocab: int) -> None:
        self.rng = rng
        self.vocab = vocab
        self.steps_left = rng.randint(4, 30)
        self.context = list(prefix)
        self.screen_len = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(n)]

    def next_prompt(self) -> list[int]:
        if self.screen_len:
            # The last screen shrinks to its header, as the agent workload's does.
            del self.context[len(self.context) - self.screen_len + 10 :]
        self.screen_len = self.rng.randint(300, 500)
        self.context += self._tokens(self.screen_len)
        self.steps_left -= 1
        return list(self.context)

    def add_reply(self, tokens: list[int]) -> None:
        self.context += tokens


def trim_time() -> float:
    """Seconds one malloc_trim(0) took."""
    started = time.perf_counter()
    ctypes.CDLL(None).malloc_trim(0)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--every", type=float, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument(
        "--trim-every", type=float, default=0, help="malloc_trim(0) every N seconds (0: never)."
    )
    args = parser.parse_args()

    llm = LLM(args.model, max_model_len=args.max_model_len)
    engine = llm.engine
    collect_and_trim()  # what loading left free, as `enduro serve` does after its warm-up
    vocab = engine.runner.arch.vocab_size
    rng = random.Random(args.seed)
    prefix = [rng.randrange(100, vocab) for _ in range(650)]
    sessions: dict[str, Session] = {}
    ids = iter(range(1 << 62))

    def start(session: Session) -> None:
        request_id = str(next(ids))
        prompt = session.next_prompt()
        params = SamplingParams(max_tokens=rng.randint(60, 200), temperature=0, ignore_eos=True)
        engine.add_request(request_id, prompt, params)
        sessions[request_id] = session

    for _ in range(args.sessions):
        start(Session(random.Random(rng.getrandbits(64)), prefix, vocab))
    replies: dict[str, list[int]] = {}
    rows: list[tuple[float, int, float, float]] = []
    started = time.monotonic()
    next_sample = started
    next_trim = started + args.trim_every
    trimmed = 0.0
    done = 0
    while time.monotonic() - started < args.seconds:
        for out in engine.step():
            replies.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                session = sessions.pop(out.request_id)
                session.add_reply(replies.pop(out.request_id))
                done += 1
                too_long = len(session.context) + 1200 > args.max_model_len
                if session.steps_left <= 0 or too_long:
                    session = Session(random.Random(rng.getrandbits(64)), prefix, vocab)
                start(session)
        engine.maintain()  # idle segments and compaction, as the engine loop runs it
        now = time.monotonic()
        if args.trim_every and now >= next_trim:
            trimmed += trim_time()
            next_trim = now + args.trim_every
        if now >= next_sample:
            anon = anon_memory_bytes() or 0
            kv = engine.kv_cache_bytes
            rows.append((now - started, done, anon / MIB, (anon - kv) / MIB))
            print(
                f"{now - started:6.0f} s  {done:4d} req  anon {anon / MIB:7.0f} MiB  "
                f"non-KV {(anon - kv) / MIB:7.0f} MiB",
                flush=True,
            )
            next_sample = now + args.every
    before = (anon_memory_bytes() or 0) - engine.kv_cache_bytes
    collect_and_trim()
    after = (anon_memory_bytes() or 0) - engine.kv_cache_bytes
    print(f"non-KV at the end {before / MIB:.0f} MiB; after gc + malloc_trim {after / MIB:.0f} MiB")
    print(f"{done} requests; periodic malloc_trim took {trimmed:.2f} s in all")
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seconds", "requests", "anon_mib", "non_kv_mib"])
            writer.writerows(rows)
            writer.writerow(["trimmed", done, "", after / MIB])
    return 0


if __name__ == "__main__":
    sys.exit(main())
