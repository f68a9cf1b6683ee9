"""One reading of the server's health, taken every guard interval in the API process.

Plain data: detectors read lists of these, /debug/guard serves them as JSON, `enduro doctor`
and `enduro soak` plot them. Figures the sampler could not read are None.
"""

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    time: float
    """Unix time of the reading."""
    engine_pid: int | None = None
    """The engine worker serving new requests; a change means it was restarted or recycled."""
    api_memory_bytes: int | None = None
    """RssAnon + VmSwap of the API process."""
    engine_memory_bytes: int | None = None
    """RssAnon + VmSwap of the engine process."""
    api_python_heap_bytes: int | None = None
    engine_python_heap_bytes: int | None = None
    engine_malloc_allocated_bytes: int | None = None
    """Bytes the engine's malloc callers hold (tensors, kernel caches, Python's large objects)."""
    engine_malloc_held_bytes: int | None = None
    """Bytes the engine's malloc keeps beyond that: freed but not yet returned, and metadata."""
    engine_live_memory_bytes: int | None = None
    """The engine's RssAnon + VmSwap less its KV pool and its malloc's kept bytes, all read in
    one heartbeat (what the leak detector fits)."""
    gc_collections: int = 0
    """Garbage collections run in the API process so far, all generations."""
    engine_cpu_wait_seconds: float | None = None
    """Run-queue wait of the engine's threads so far (`guard/cpu.py`): its rate is the CPU
    time per second the engine wanted and did not get."""
    num_fds: int = 0
    """Open file descriptors of the API process."""
    num_threads: int = 0
    """Threads of the API process."""
    kv_used_blocks: int | None = None
    kv_cached_blocks: int | None = None
    kv_free_blocks: int | None = None
    """Free blocks in allocated segments (neither used nor cached)."""
    kv_num_blocks: int | None = None
    """Blocks in allocated segments."""
    kv_max_blocks: int | None = None
    kv_num_segments: int | None = None
    """Allocated segments."""
    kv_fragmentation: float | None = None
    kv_cache_bytes: int | None = None
    """Memory of the allocated KV segments."""
    num_running: int | None = None
    num_waiting: int | None = None
    num_requests: int = 0
    """Requests that reached the engine and finished, since the server started."""
    num_generation_tokens: int = 0
    """Tokens generated for clients since the server started."""
    ttft_p50: float | None = None
    """Time to first token of the requests that finished during the interval, seconds."""
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    """Mean time per output token after the first, of requests finished in the interval."""
    tpot_p99: float | None = None
    step_seconds_mean: float | None = None
    """Mean engine step duration over the interval."""
    pool_violations: list[str] = field(default_factory=list)
    """Broken KV pool invariants the engine reported (empty when healthy)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def memory_bytes(self) -> int | None:
        """API + engine memory; None unless both were read."""
        if self.api_memory_bytes is None or self.engine_memory_bytes is None:
            return None
        return self.api_memory_bytes + self.engine_memory_bytes
