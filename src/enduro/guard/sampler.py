"""The guard's sampler: one Sample of the server's health per interval (guard/sample.py).

Process figures are read here (the API process) and from /proc for the engine; engine
figures come from its latest heartbeat; latencies from the records of requests that
finished during the interval (fed by Telemetry as they finish).
"""

import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from enduro.guard.cpu import cpu_wait_seconds
from enduro.guard.sample import Sample
from enduro.guard.stats import percentile
from enduro.observability.process_memory import anon_memory_bytes, python_heap_bytes
from enduro.observability.request_record import RequestRecord
from enduro.server.ipc import EngineStats


class EngineView(Protocol):
    @property
    def stats(self) -> EngineStats | None: ...

    @property
    def pid(self) -> int | None: ...


class GuardSampler:
    def __init__(self, engine: EngineView, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.num_requests = 0
        self.num_generation_tokens = 0
        self._ttfts: list[float] = []
        self._tpots: list[float] = []
        self._lock = threading.Lock()  # records may arrive from other threads
        self._last_steps: tuple[int, float] | None = None  # (count, sum) at the last sample

    def observe(self, record: RequestRecord) -> None:
        """A finished request (Telemetry calls this for every record)."""
        if not record.reached_engine:
            return
        with self._lock:
            self.num_requests += 1
            self.num_generation_tokens += record.num_generation_tokens
            if record.time_to_first_token is not None:
                self._ttfts.append(record.time_to_first_token)
            if record.inter_token_latencies:
                latencies = record.inter_token_latencies
                self._tpots.append(sum(latencies) / len(latencies))

    def take(self) -> Sample:
        with self._lock:
            ttfts, self._ttfts = self._ttfts, []
            tpots, self._tpots = self._tpots, []
            num_requests, num_tokens = self.num_requests, self.num_generation_tokens
        stats, pid = self.engine.stats, self.engine.pid
        return Sample(
            time=self.clock(),
            engine_pid=pid,
            api_memory_bytes=anon_memory_bytes(),
            engine_memory_bytes=anon_memory_bytes(pid) if pid is not None else None,
            api_python_heap_bytes=python_heap_bytes(),
            engine_python_heap_bytes=stats.python_heap_bytes if stats else None,
            engine_malloc_allocated_bytes=stats.malloc_allocated_bytes if stats else None,
            engine_malloc_held_bytes=stats.malloc_held_bytes if stats else None,
            engine_live_memory_bytes=_live_memory(stats),
            engine_cpu_wait_seconds=cpu_wait_seconds(pid) if pid is not None else None,
            gc_collections=sum(generation["collections"] for generation in gc.get_stats()),
            num_fds=_count_fds(),
            num_threads=threading.active_count(),
            kv_used_blocks=stats.num_used_blocks if stats else None,
            kv_cached_blocks=stats.num_cached_blocks if stats else None,
            kv_free_blocks=stats.num_free_blocks if stats else None,
            kv_num_blocks=stats.num_blocks if stats else None,
            kv_max_blocks=stats.max_num_blocks if stats else None,
            kv_num_segments=stats.num_segments if stats else None,
            kv_fragmentation=stats.kv_cache_fragmentation if stats else None,
            kv_cache_bytes=stats.kv_cache_bytes if stats else None,
            num_running=stats.num_running if stats else None,
            num_waiting=stats.num_waiting if stats else None,
            num_requests=num_requests,
            num_generation_tokens=num_tokens,
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            tpot_p50=percentile(tpots, 50),
            tpot_p99=percentile(tpots, 99),
            step_seconds_mean=self._step_seconds_mean(stats),
            pool_violations=list(stats.pool_violations) if stats else [],
        )

    def _step_seconds_mean(self, stats: EngineStats | None) -> float | None:
        if stats is None:
            return None
        now = (sum(stats.step_seconds_counts), stats.step_seconds_sum)
        previous, self._last_steps = self._last_steps, now
        if previous is None or now[0] <= previous[0]:  # no step, or a new engine's counters
            return None
        return (now[1] - previous[1]) / (now[0] - previous[0])


def _count_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _live_memory(stats: EngineStats | None) -> int | None:
    """The engine's memory less its KV pool and its allocator's kept free pages, from one
    heartbeat; None when the heartbeat lacks the figures."""
    if stats is None or stats.memory_bytes is None:
        return None
    return stats.memory_bytes - stats.kv_cache_bytes - (stats.malloc_held_bytes or 0)
