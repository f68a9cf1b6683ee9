"""Configuration: one frozen dataclass per concern, each field documented and validated.

CLI flags are derived from these fields (see cli.py), so the help text lives here.
"""

from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_FORMATS = ("text", "json")
QUANTIZATIONS = ("none", "int8", "int4")


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
    """Weight-only quantization of the linear layers and output projection (CPU kernels): none,
    int8 (per-output-channel scales) or int4 (asymmetric, groups of 32 inputs)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.quantization != "none" and self.device != "cpu":
            raise ValueError("quantization runs on CPU kernels only: use device cpu")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 1 << 30
    """Memory for the KV cache pool, in bytes."""
    num_blocks: int | None = None
    """Blocks in the pool; overrides kv_cache_bytes when set."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    """Requests running at once."""
    max_num_batched_tokens: int = 512
    """Tokens computed in one step (the token budget); long prompts are prefilled in chunks."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")


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

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if self.metrics_port is not None:
            if not 0 < self.metrics_port < 65536:
                raise ValueError("metrics_port must be in [1, 65535]")
            if self.metrics_port == self.port:
                raise ValueError("metrics_port must differ from port")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        for name in ("max_body_bytes", "max_queue", "max_queued_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
