"""Which malloc the engine process runs on.

A long-running engine allocates transient buffers whose size follows the batch and the
contexts (attention scores, gathered K/V). glibc keeps what such buffers freed (its dynamic
mmap threshold moves large blocks onto the heap, and a heap only shrinks from the top), so
the engine's memory climbs to its high-water mark and stays there; jemalloc hands unused
pages back after a short decay. benchmarks/README.md ("Allocators") has the measurements.

jemalloc runs without its time-based decay (JEMALLOC_CONF). With the default 10 s decay it
still purges a freed buffer of more than ≈7 MiB at once, so every decode step at 16 streams
faulted in ≈90 MB of fresh zeroed pages (the 16 × 262,144 float logits and their copies):
≈24,000 page faults a step, a quarter of its time. Freed pages now stay for reuse, and the
engine purges them on its own schedule instead (engine/page_purge.py): once it has been idle
for a few seconds, and every half minute under load.

"auto" (the default) preloads jemalloc (Debian's libjemalloc2, which the Makefile installs)
when it is installed, else keeps glibc. The API process stays on glibc: its memory is flat
(parsed requests and responses, no tensors) and it is trimmed once after loading.
"""

import ctypes.util
import os
from pathlib import Path

from enduro.config import ENGINE_ALLOCATORS as ALLOCATORS

JEMALLOC_CONF = "dirty_decay_ms:-1"
"""The engine's jemalloc options; a MALLOC_CONF already in the environment comes after them,
so its settings win."""

JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def jemalloc_library() -> str | None:
    for candidate in JEMALLOC_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("jemalloc")


def resolve_allocator(choice: str) -> str:
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}")
    if choice == "auto":
        return "jemalloc" if jemalloc_library() is not None else "glibc"
    return choice


def engine_environment(choice: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an engine process on `choice`."""
    env = dict(os.environ if base is None else base)
    allocator = resolve_allocator(choice)
    library = jemalloc_library() if allocator == "jemalloc" else None
    if allocator == "jemalloc" and library is None:
        raise ValueError("jemalloc is not installed (Debian: apt-get install libjemalloc2)")
    if library is not None:
        preload = env.get("LD_PRELOAD")
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
        conf = env.get("MALLOC_CONF")
        env["MALLOC_CONF"] = f"{JEMALLOC_CONF},{conf}" if conf else JEMALLOC_CONF
    return env
