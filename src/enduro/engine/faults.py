"""Planted faults, for tests and demos of the guard only (the server refuses to arm them
unless started with --enable-fault-injection).

Each is a real defect of the kind long-running servers suffer, not a simulation of its
symptoms: memory that is kept forever, steps that are slower than they need be, KV blocks
whose reference is never dropped, and an allocation order that scatters live blocks.
"""

import time
from dataclasses import dataclass

from enduro.core.kv_cache_manager import KVCacheManager
from enduro.request import Request


@dataclass(frozen=True)
class FaultSettings:
    leak_bytes_per_request: int = 0
    """Bytes kept forever (and touched, so resident) for every finished request."""
    slow_step_seconds: float = 0.0
    """Extra seconds every engine step sleeps."""
    leak_blocks_per_request: int = 0
    """KV blocks of every finished request whose reference is never dropped."""
    fragment: bool = False
    """New KV blocks come from the highest free id instead of the lowest."""

    def __post_init__(self) -> None:
        if self.leak_bytes_per_request < 0 or self.leak_blocks_per_request < 0:
            raise ValueError("fault sizes must be >= 0")
        if not 0 <= self.slow_step_seconds <= 10:
            raise ValueError("slow_step_seconds must be in [0, 10]")


class Faults:
    def __init__(self) -> None:
        self.settings = FaultSettings()
        self._leaked: list[bytes] = []
        self.num_leaked_blocks = 0

    def arm(self, settings: FaultSettings, kv_cache_manager: KVCacheManager) -> None:
        self.settings = settings
        kv_cache_manager.block_pool.allocate_high = settings.fragment

    @property
    def leaked_bytes(self) -> int:
        """Bytes kept so far by this engine process (disarming does not give them back)."""
        return sum(len(chunk) for chunk in self._leaked)

    def before_step(self) -> None:
        if self.settings.slow_step_seconds:
            time.sleep(self.settings.slow_step_seconds)

    def on_finished(self, request: Request, kv_cache_manager: KVCacheManager) -> None:
        """Called before the request's blocks are freed."""
        if self.settings.leak_bytes_per_request:
            # b"\x01" * n writes every page, so the leak is resident, as real ones are.
            self._leaked.append(b"\x01" * self.settings.leak_bytes_per_request)
        held = kv_cache_manager.req_to_blocks.get(request.request_id, [])
        for block in held[: self.settings.leak_blocks_per_request]:
            block.ref_cnt += 1  # the defect: a reference nobody will ever drop
            self.num_leaked_blocks += 1
