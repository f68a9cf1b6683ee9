from enduro.guard.introspection import HeapBaseline, collect_and_trim
from tests.allocator_script import run_json_script

# Frees 256 MiB of 1 MiB buffers, then asks the allocator to give memory back; prints
# the process's anonymous memory before and after, and what collect_and_trim did.
FREE_AND_TRIM = """
import json
from enduro.guard.introspection import collect_and_trim
from enduro.observability.process_memory import anon_memory_bytes
held = [bytearray(b"x" * (1 << 20)) for _ in range(256)]
del held
before = anon_memory_bytes()
done = collect_and_trim()
print(json.dumps({"before": before, "after": anon_memory_bytes(), **done}))
"""


def run_free_and_trim(allocator: str, **env: str) -> dict[str, object]:
    out: dict[str, object] = run_json_script(FREE_AND_TRIM, allocator, env=env)
    return out


def test_jemalloc_purge_gives_freed_memory_back() -> None:
    # jemalloc keeps freed pages for its decay time; with decay off, only the purge can
    # return them.
    done = run_free_and_trim("jemalloc", MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    assert done["jemalloc_purged"] is True and done["malloc_trim_released"] is None
    before, after = done["before"], done["after"]
    assert isinstance(before, int) and isinstance(after, int)
    assert before - after > 200 << 20


def test_glibc_trim_reports_what_it_did() -> None:
    done = run_free_and_trim("glibc")
    assert done["jemalloc_purged"] is None and isinstance(done["malloc_trim_released"], bool)
    assert isinstance(done["gc_collected"], int)


def test_heap_baseline_reports_growth_by_type() -> None:
    class Marker:
        pass

    baseline = HeapBaseline(trace=False)
    kept = [Marker() for _ in range(1000)]
    growth = baseline.growth(top=5)
    assert growth["tracemalloc"] is None
    assert {"type": "Marker", "count": 1000, "delta": 1000} in growth["gc_types"]
    assert len(kept) == 1000 and collect_and_trim()["gc_collected"] >= 0
