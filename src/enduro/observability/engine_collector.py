"""Scrape-time metrics from the engine: its latest heartbeat, the supervisor, and memory.

Nothing here is stored between scrapes: every collect() reads the current heartbeat snapshot
(EngineStats), so a scrape never sees a half-updated engine. Engine-side counts (preemptions,
prefix-cache tokens, step times) run from the engine process's start: when the supervisor
restarts the engine they start again from 0, which Prometheus reads as a counter reset, as it
would for any restarted process. While no heartbeat has arrived (starting, restarting) those
families have no samples.

Memory (observability/process_memory.py): `process="api"` is read here, in the API process;
`process="engine"` reads the engine's /proc entry by pid, and takes its Python heap from the
heartbeat, since only the engine can walk its own allocator.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from enduro.observability.process_memory import (
    anon_memory_bytes,
    malloc_stats,
    python_heap_bytes,
)
from enduro.server.ipc import STEP_SECONDS_BUCKETS, EngineStats


class EngineSource(Protocol):
    """What the collector reads from the engine client (EngineClient has all three)."""

    @property
    def stats(self) -> EngineStats | None: ...

    @property
    def num_restarts(self) -> int: ...

    @property
    def pid(self) -> int | None: ...


def _gauge(name: str, documentation: str, value: float | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def _counter(name: str, documentation: str, value: float | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


# Families that are one heartbeat field each: (family, name, help, EngineStats field).
HEARTBEAT_FAMILIES: tuple[tuple[Callable[[str, str, float | None], Metric], str, str, str], ...] = (
    (
        _gauge,
        "enduro_requests_running",
        "Requests the engine is running (holding KV blocks).",
        "num_running",
    ),
    (
        _gauge,
        "enduro_requests_waiting",
        "Requests queued in the engine, not yet running (preempted ones included).",
        "num_waiting",
    ),
    (
        _counter,
        "enduro_preemptions",
        "Running requests preempted (KV blocks freed, recomputed later).",
        "num_preemptions",
    ),
    (
        _counter,
        "enduro_prefix_cache_queries_tokens",
        "Prompt tokens looked up in the prefix cache.",
        "num_prefix_queries",
    ),
    (
        _counter,
        "enduro_prefix_cache_hits_tokens",
        "Prompt tokens served from the prefix cache.",
        "num_prefix_hits",
    ),
    (
        _counter,
        "enduro_prefix_cache_evictions",
        "Cached KV blocks evicted (LRU, the byte cap, or a trim).",
        "num_evictions",
    ),
    (_gauge, "enduro_kv_cache_max_blocks", "Blocks the KV pool may grow to.", "max_num_blocks"),
    (
        _counter,
        "enduro_kv_cache_segments_grown",
        "KV pool segments allocated as the pool grew.",
        "num_segments_grown",
    ),
    (
        _counter,
        "enduro_kv_cache_segments_released",
        "KV pool segments released (idle, or emptied by compaction).",
        "num_segments_released",
    ),
    (
        _counter,
        "enduro_kv_cache_compaction_moves",
        "KV blocks moved by compaction.",
        "num_compaction_moves",
    ),
    (
        _gauge,
        "enduro_kv_cache_fragmentation_ratio",
        "Share of free KV blocks in segments that also hold live (used or cached) blocks: "
        "memory no segment release can return until compaction moves them.",
        "kv_cache_fragmentation",
    ),
    (
        _counter,
        "enduro_engine_prefill_tokens",
        "Prompt tokens the engine computed (prefix-cache hits left out, recomputes in).",
        "num_prefill_tokens",
    ),
    (
        _counter,
        "enduro_engine_decode_tokens",
        "Tokens the engine generated.",
        "num_generation_tokens",
    ),
    (
        _counter,
        "enduro_allocator_purges",
        "Times the engine handed its allocator's freed pages back to the kernel (jemalloc "
        "keeps them for reuse between steps; the engine purges when idle and every 30 s).",
        "num_allocator_purges",
    ),
    (
        _gauge,
        "enduro_kv_cache_bytes",
        "Memory of the KV pool's allocated segments.",
        "kv_cache_bytes",
    ),
)


class EngineCollector:
    def __init__(self, engine: EngineSource) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        """The families without reading anything (the registry checks names at register)."""
        return list(self._families(None, None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.engine.stats, self.engine.pid, read=True))

    def _families(
        self, stats: EngineStats | None, pid: int | None, read: bool = False
    ) -> Iterator[Metric]:
        yield from self._heartbeat_fields(stats)
        yield from self._kv_cache(stats)
        yield self._step_seconds(stats)
        yield _counter(
            "enduro_engine_restarts",
            "Times the supervisor restarted the engine process after it died.",
            self.engine.num_restarts if read else None,
        )
        yield from self._memory(stats, pid, read)

    def _heartbeat_fields(self, stats: EngineStats | None) -> Iterator[Metric]:
        for family, name, documentation, field in HEARTBEAT_FAMILIES:
            yield family(name, documentation, getattr(stats, field) if stats else None)

    def _kv_cache(self, stats: EngineStats | None) -> Iterator[Metric]:
        blocks = GaugeMetricFamily(
            "enduro_kv_cache_blocks",
            "KV blocks by state: used (held by a request), cached (unreferenced, holding a "
            "reusable prefix; evicted on demand), free (neither).",
            labels=["state"],
        )
        if stats:
            blocks.add_metric(["used"], stats.num_used_blocks)
            blocks.add_metric(["cached"], stats.num_cached_blocks)
            blocks.add_metric(["free"], stats.num_free_blocks)
        yield blocks
        segments = GaugeMetricFamily(
            "enduro_kv_cache_segments",
            "KV pool segments: allocated (holding memory), and the most there may be.",
            labels=["state"],
        )
        if stats:
            segments.add_metric(["allocated"], stats.num_segments)
            segments.add_metric(["max"], stats.max_num_segments)
        yield segments
        yield _gauge(
            "enduro_kv_cache_usage_ratio",
            "Share of the pool's maximum blocks used by requests (cached blocks are available).",
            stats.num_used_blocks / stats.max_num_blocks if stats else None,
        )
        yield _gauge(
            "enduro_kv_cache_invariant_violations",
            "Broken KV pool invariants found at the latest check (0 when healthy).",
            len(stats.pool_violations) if stats else None,
        )

    def _step_seconds(self, stats: EngineStats | None) -> Metric:
        family = HistogramMetricFamily(
            "enduro_engine_step_seconds", "Duration of one engine step (schedule, forward, sample)."
        )
        if stats:
            cumulative, buckets = 0, []
            bounds = [*map(str, STEP_SECONDS_BUCKETS), "+Inf"]
            for bound, count in zip(bounds, stats.step_seconds_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([], buckets, sum_value=stats.step_seconds_sum)
        return family

    def _memory(self, stats: EngineStats | None, pid: int | None, read: bool) -> Iterator[Metric]:
        memory = GaugeMetricFamily(
            "enduro_process_memory_bytes",
            "Anonymous memory of a process, resident or swapped (RssAnon + VmSwap).",
            labels=["process"],
        )
        heap = GaugeMetricFamily(
            "enduro_python_heap_bytes",
            "Bytes in live blocks of CPython's small-object allocator (objects <= 512 bytes).",
            labels=["process"],
        )
        malloc = GaugeMetricFamily(
            "enduro_malloc_bytes",
            "What the C allocator reports: bytes its callers hold (allocated; the engine's KV"
            " pool reservation left out) and bytes it keeps besides (held: freed, not returned).",
            labels=["process", "state"],
        )
        if read:
            readings = {
                "api": (anon_memory_bytes(), python_heap_bytes()),
                "engine": (
                    anon_memory_bytes(pid) if pid is not None else None,
                    stats.python_heap_bytes if stats else None,
                ),
            }
            for process, (memory_bytes, heap_bytes) in readings.items():
                if memory_bytes is not None:
                    memory.add_metric([process], memory_bytes)
                if heap_bytes is not None:
                    heap.add_metric([process], heap_bytes)
            api = malloc_stats()
            malloc_readings = {
                ("api", "allocated"): api.allocated_bytes if api else None,
                ("api", "held"): api.held_bytes if api else None,
                ("engine", "allocated"): stats.malloc_allocated_bytes if stats else None,
                ("engine", "held"): stats.malloc_held_bytes if stats else None,
            }
            for labels, value in malloc_readings.items():
                if value is not None:
                    malloc.add_metric(list(labels), value)
        yield memory
        yield heap
        yield malloc
