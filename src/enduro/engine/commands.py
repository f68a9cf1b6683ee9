"""The engine's command interface: the narrow actions and queries the guard and `enduro
doctor` may ask of it (DESIGN.md: detectors observe, only the ladder acts, through these).

Each command takes and returns a small JSON-able map. `profile` spans several steps, so the
loop runs it (engine/profiling.py); the rest answer at once, between two steps.
"""

from dataclasses import asdict
from typing import Any

from enduro.engine.engine_core import EngineCore
from enduro.engine.faults import FaultSettings
from enduro.guard.introspection import HeapBaseline, collect_and_trim
from enduro.observability.process_memory import anon_memory_bytes


class CommandError(ValueError):
    """A command the engine does not know, or with arguments it cannot take."""


class EngineCommands:
    def __init__(self, core: EngineCore, heap_baseline: HeapBaseline) -> None:
        self.core = core
        self.heap_baseline = heap_baseline
        self.force_compaction = False  # the loop keeps compacting until nothing is left

    def run(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = {
            "trim": self.trim,
            "collect": self.collect,
            "pool": self.pool,
            "memory": self.memory,
            "faults": self.faults,
        }.get(name)
        if handler is None:
            raise CommandError(f"unknown engine command {name!r}")
        return handler(args)

    def trim(self, args: dict[str, Any]) -> dict[str, Any]:
        """Evict the least recently used half of the prefix cache (or keep `keep_fraction`),
        then compact and release the segments that frees. Compaction goes on in the
        following pauses between steps if there is more to move than one pause allows."""
        pool = self.core.kv_cache_manager.block_pool
        before = anon_memory_bytes()
        keep_fraction = float(args.get("keep_fraction", 0.5))
        evicted = pool.trim_prefix_cache(int(pool.num_cached_blocks * keep_fraction))
        report = self.core.maintain(force=True)
        self.force_compaction = pool.num_reclaimable_segments > 0
        return {
            "evicted_blocks": evicted,
            "moved_blocks": report.num_moves,
            "released_segments": report.released_segments,
            "memory_before": before,
            "memory_after": anon_memory_bytes(),
        }

    def collect(self, args: dict[str, Any]) -> dict[str, Any]:
        before = anon_memory_bytes()
        done = collect_and_trim()
        return {**done, "memory_before": before, "memory_after": anon_memory_bytes()}

    def pool(self, args: dict[str, Any]) -> dict[str, Any]:
        pool = self.core.kv_cache_manager.block_pool
        runner = self.core.runner
        return {
            "block_size": runner.block_size,
            "segment_blocks": pool.segment_blocks,
            "bytes_per_block": runner.kv_cache.block_bytes,
            "num_segments": pool.num_segments,
            "max_num_segments": pool.layout.max_num_segments,
            "fragmentation": pool.fragmentation,
            "num_used_blocks": pool.num_used_blocks,
            "num_cached_blocks": pool.num_cached_blocks,
            "num_free_blocks": pool.num_free_blocks,
            "segments": [asdict(state) for state in pool.segment_states()],
        }

    def memory(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.heap_baseline.growth(int(args.get("top", 20)))

    def faults(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            settings = FaultSettings(**args)
        except (TypeError, ValueError) as e:
            raise CommandError(f"bad fault settings: {e}") from e
        self.core.faults.arm(settings, self.core.kv_cache_manager)
        return {**asdict(settings), "leaked_bytes": self.core.faults.leaked_bytes}
