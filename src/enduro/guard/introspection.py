"""Looking inside a Python process: object counts by type, allocation growth, and giving
freed heap memory back to the kernel. Used in both the API and the engine process.

- gc type counts walk every tracked object (tens to hundreds of milliseconds): only on
  request (`enduro doctor`), never per sample.
- tracemalloc costs memory and time on every allocation, so it runs only when the server was
  started with --tracemalloc; growth is measured against a snapshot taken at start.
- malloc_trim(0) asks glibc to return free memory at the top of the heap and in its arenas;
  a process that freed a lot may keep it mapped otherwise (DESIGN.md decision 7). Under
  jemalloc (the engine's default allocator when installed) the same request is a purge of
  every arena through mallctl; glibc's malloc_trim would only look at glibc's unused heap.
"""

import ctypes
import functools
import gc
import tracemalloc
from collections import Counter
from typing import Any

from enduro.observability.process_memory import jemalloc_purge


def gc_type_counts() -> Counter[str]:
    return Counter(type(obj).__name__ for obj in gc.get_objects())


class HeapBaseline:
    """What the process held when it became ready; growth is reported against it."""

    def __init__(self, trace: bool) -> None:
        if trace and not tracemalloc.is_tracing():
            tracemalloc.start(8)
        self.types = gc_type_counts()
        self.snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None

    def growth(self, top: int) -> dict[str, Any]:
        """{"gc_types": [{type, count, delta}], "tracemalloc": [...] | None}, largest growth
        first."""
        now = gc_type_counts()
        growth = sorted(
            ((count - self.types.get(name, 0), name, count) for name, count in now.items()),
            key=lambda row: (-row[0], row[1]),
        )
        types = [{"type": name, "count": count, "delta": delta} for delta, name, count in growth]
        return {"gc_types": types[:top], "tracemalloc": self._allocation_growth(top)}

    def _allocation_growth(self, top: int) -> list[dict[str, Any]] | None:
        if self.snapshot is None or not tracemalloc.is_tracing():
            return None
        stats = tracemalloc.take_snapshot().compare_to(self.snapshot, "lineno")
        return [
            {
                "where": f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}",
                "size_bytes": stat.size,
                "size_diff": stat.size_diff,
                "count_diff": stat.count_diff,
            }
            for stat in stats[:top]
        ]


@functools.cache
def _malloc_trim() -> "ctypes._NamedFuncPointer | None":
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def collect_and_trim() -> dict[str, Any]:
    """gc.collect() then malloc_trim(0), or a purge of every arena under jemalloc; what each
    did (None: that allocator is not the one in use)."""
    collected = gc.collect()
    purged = jemalloc_purge()
    if purged is not None:
        return {"gc_collected": collected, "malloc_trim_released": None, "jemalloc_purged": purged}
    trim = _malloc_trim()
    released = bool(trim(0)) if trim is not None else None
    return {"gc_collected": collected, "malloc_trim_released": released, "jemalloc_purged": None}
