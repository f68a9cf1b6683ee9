"""Configuration: one frozen dataclass per concern, each field documented and validated.

CLI flags are derived from these fields (see cli.py), so the help text lives here.
"""

from dataclasses import dataclass, field, fields
from typing import Any

from enduro.core.block_pool import PoolLayout

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_FORMATS = ("text", "json")
ENGINE_ALLOCATORS = ("auto", "glibc", "jemalloc")
QUANTIZATIONS = ("none", "int8", "w8a8", "int4", "int4-head")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """A .gguf file or an HF directory; None = the default Gemma 3 270M."""
    dtype: str = "auto"
    """Weights and KV dtype: auto (bfloat16 where the CPU has native bf16, else float32)."""
    device: str = "cpu"
    """Torch device the model runs on."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; None = the model's own limit."""
    cache_dir: str | None = None
    """Prepared-weights cache; None = $ENDURO_CACHE_DIR or ~/.cache/enduro."""
    seed: int = 0
    """Seed of the shared generator used by requests without their own seed."""
    quantization: str = "none"
    """Quantization of the linear layers and output projection (CPU kernels): none, int8
    (weight-only, per-output-channel scales), w8a8 (int8's weights, and activations quantized
    to int8 as they arrive, per row and group of 128 inputs; needs AVX512-VNNI, else runs as
    int8), int4 (weight-only, asymmetric, groups of 32 inputs), or int4-head (the output
    projection alone in int4, the decoder layers in the model's dtype)."""
    threads: int | None = None
    """Torch threads of the engine (intra-op); None = torch's default, one per core. Lower it
    when several engines share a machine: OpenMP threads that outnumber the cores spin
    against each other."""

    compile: bool = False
    """Compile the elementwise stretches of each decoder layer (norms, rotary embedding,
    activation, residual adds) with torch.compile: fewer, fused kernels a step, at the cost of
    a C++ compiler at start-up (tens of seconds the first time, cached on disk after)."""

    native_kernels: bool = True
    """Run decode attention (straight from the paged KV cache, no gathered copy of each
    context), the RMSNorms, int8 projections and each decoder layer's whole decode step in
    enduro's C kernels, built with the machine's C compiler at the first start (about a second,
    cached on disk); bf16 on CPU. Off, or without a compiler, torch's SDPA and ops run
    instead, and the bf16 projections are packed for oneDNN."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.quantization != "none" and self.device != "cpu":
            raise ValueError("quantization runs on CPU kernels only: use device cpu")


PREFIX_CACHE_MODES = ("off", "lru")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_initial: int = 64 << 20
    """Memory the KV pool starts with, in bytes (rounded up to whole segments); it never
    shrinks below this."""
    kv_cache_max: int = 1 << 30
    """Memory the KV pool may grow to, in bytes, one segment at a time."""
    num_blocks: int | None = None
    """Blocks in the pool at most; overrides kv_cache_max when set."""
    kv_segment_blocks: int = 32
    """Blocks per segment: the unit the pool grows and releases by."""
    kv_idle_release: float = 60.0
    """Seconds a segment above the initial size must stay empty before it is released."""
    kv_fragmentation_threshold: float = 0.5
    """Compact the pool when this share of its free blocks sits in segments that also hold
    live blocks, and compaction could release at least one segment."""
    max_compaction_moves: int = 64
    """Blocks compaction moves between two steps at most, so latency stays smooth."""
    prefix_cache: str = "lru"
    """Reuse KV blocks of identical prompt prefixes: off, or lru (least recently used
    unreferenced blocks are evicted first)."""
    prefix_cache_max_bytes: int | None = None
    """Cap on the memory of unreferenced cached blocks; None = bounded by the pool alone."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        for name in ("kv_cache_initial", "kv_cache_max", "kv_segment_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.kv_cache_initial > self.kv_cache_max:
            raise ValueError("kv_cache_initial must not exceed kv_cache_max")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        if self.kv_idle_release < 0:
            raise ValueError("kv_idle_release must be >= 0")
        if not 0 <= self.kv_fragmentation_threshold <= 1:
            raise ValueError("kv_fragmentation_threshold must be in [0, 1]")
        if self.max_compaction_moves < 0:
            raise ValueError("max_compaction_moves must be >= 0")
        if self.prefix_cache not in PREFIX_CACHE_MODES:
            raise ValueError(f"prefix_cache must be one of {', '.join(PREFIX_CACHE_MODES)}")
        if self.prefix_cache_max_bytes is not None and self.prefix_cache_max_bytes < 0:
            raise ValueError("prefix_cache_max_bytes must be >= 0")

    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache != "off"

    def pool_layout(self, bytes_per_block: int) -> PoolLayout:
        """Blocks, segments and the cache cap, from the byte sizes."""
        max_num_blocks = self.num_blocks or max(1, self.kv_cache_max // bytes_per_block)
        segment_blocks = min(self.kv_segment_blocks, max_num_blocks)
        layout = PoolLayout(max_num_blocks, segment_blocks, 1)
        initial_blocks = -(-self.kv_cache_initial // bytes_per_block)
        initial_segments = min(layout.max_num_segments, -(-initial_blocks // segment_blocks))
        max_cached = None
        if self.prefix_cache_max_bytes is not None:
            max_cached = self.prefix_cache_max_bytes // bytes_per_block
        return PoolLayout(max_num_blocks, segment_blocks, max(1, initial_segments), max_cached)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    """Requests running at once."""
    max_num_batched_tokens: int = 512
    """Tokens computed in one step (the token budget); long prompts are prefilled in chunks.
    A prompt whose rest is over the budget by no more than `chunk_tail` tokens finishes in
    the step all the same."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")

    @property
    def chunk_tail(self) -> int:
        """Tokens a prompt's last chunk may run past the budget: 1/32 of it (16 of 512). Left
        to a step of their own they would cost a full pass over the weights, about a decode
        step, for a handful of tokens: a 514-token prompt (512 words and BOS, say) took 127 ms
        in two steps against 118 ms for 512 (benchmarks/README.md, "Int8 activations")."""
        return self.max_num_batched_tokens // 32

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step computes: the budget and a prompt's tail."""
        return self.max_num_batched_tokens + self.chunk_tail


GUARD_MODES = ("off", "observe", "heal")


@dataclass(frozen=True)
class GuardConfig:
    guard: str = "heal"
    """What the guard does: off (nothing sampled), observe (sample, detect, alert) or heal
    (also act: trim and compact the KV pool, collect garbage, recycle the engine worker)."""
    guard_interval: float = 2.0
    """Seconds between the guard's samples of memory, latency and the KV pool."""
    guard_warmup: float = 120.0
    """Seconds after a process (re)starts before its memory counts towards a leak fit: the
    first requests of each kind still import modules and fill caches."""
    guard_window: float = 300.0
    """Seconds of recent samples the leak fit and the memory forecast use."""
    leak_threshold: int = 64 << 20
    """Memory growth in bytes per hour that is a leak, when the trend is also significant."""
    leak_min_growth: int = 16 << 20
    """Fewest bytes the fitted trend must add over the samples it fits: on a smooth series a
    settling creep (caches and queues reaching their working size, ≈10 MiB in 5 minutes on
    the default model) is significant and, over a short span, faster than leak_threshold."""
    leak_p_value: float = 0.001
    """Largest Mann-Kendall p-value at which a memory trend counts as real."""
    drift_k: float = 4.0
    """Latency drifts when its recent mean passes the baseline mean + k standard deviations."""
    drift_min_increase: float = 0.5
    """...and is also at least this much (relative) above the baseline mean: a workload's
    own swings (longer contexts, bigger batches) move latency by tens of percent."""
    drift_baseline: float = 600.0
    """Seconds of samples, before the recent ones, that make the latency baseline."""
    drift_recent: float = 120.0
    """Seconds of the most recent samples compared against the baseline: a drift must last
    this long to count."""
    memory_limit: int | None = None
    """Bytes the server may use (API + engine); None = the cgroup limit, else physical memory."""
    guard_cooldown: float = 30.0
    """Seconds after a remediation before the ladder escalates if the problem persists."""
    recycle_interval: float = 300.0
    """Fewest seconds between two recycles of the engine worker."""
    tracemalloc: bool = False
    """Trace Python allocations (costly) so `enduro doctor` can show where memory grows."""
    enable_fault_injection: bool = False
    """Allow POST /debug/faults to plant leaks, slow steps and fragmentation (tests, demos)."""

    def __post_init__(self) -> None:
        if self.guard not in GUARD_MODES:
            raise ValueError(f"guard must be one of {', '.join(GUARD_MODES)}")
        for name in ("guard_interval", "guard_window", "drift_recent", "drift_baseline"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("guard_warmup", "guard_cooldown", "recycle_interval", "drift_min_increase"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("leak_threshold", "leak_min_growth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 < self.leak_p_value < 1:
            raise ValueError("leak_p_value must be in (0, 1)")
        if self.drift_k <= 0:
            raise ValueError("drift_k must be positive")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise ValueError("memory_limit must be positive")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Route flat keyword arguments (as LLM(...) and the CLI take them) to their section."""
        sections: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}}
        owners = {
            f.name: section
            for section, kind in (
                ("model", ModelConfig),
                ("cache", CacheConfig),
                ("scheduler", SchedulerConfig),
            )
            for f in fields(kind)
        }
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine option {key!r}")
            sections[owners[key]][key] = value
        return cls(
            model=ModelConfig(**sections["model"]),
            cache=CacheConfig(**sections["cache"]),
            scheduler=SchedulerConfig(**sections["scheduler"]),
        )


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port to listen on."""
    served_model_name: str | None = None
    """Model name the API reports and accepts; None = derived from the model path."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` (or set ENDURO_API_KEY)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 beyond)."""
    max_queue: int = 64
    """Requests waiting for the engine before new ones get 503."""
    max_queued_tokens: int = 65536
    """Prompt tokens waiting for the engine before new requests get 503."""
    max_n: int = 8
    """Largest `n` (choices per request)."""
    shutdown_timeout: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before exiting."""
    metrics_port: int | None = None
    """Also serve GET /metrics, without the API key, on this port (same host)."""
    log_format: str = "text"
    """Log lines as text, or json (one object per line: one per request, one per engine
    event)."""
    log_prompts: bool = False
    """Put prompt text in the request log lines (off by default: prompts may be personal)."""
    engine_allocator: str = "auto"
    """malloc of the engine process: auto (jemalloc when Debian's libjemalloc2 is installed,
    else glibc), glibc, or jemalloc."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if self.metrics_port is not None:
            if not 0 < self.metrics_port < 65536:
                raise ValueError("metrics_port must be in [1, 65535]")
            if self.metrics_port == self.port:
                raise ValueError("metrics_port must differ from port")
        if self.engine_allocator not in ENGINE_ALLOCATORS:
            raise ValueError(f"engine_allocator must be one of {', '.join(ENGINE_ALLOCATORS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        for name in ("max_body_bytes", "max_queue", "max_queued_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
