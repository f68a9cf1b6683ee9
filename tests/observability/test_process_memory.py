from enduro.observability.process_memory import anon_memory_bytes, malloc_stats
from tests.allocator_script import run_json_script

MIB = 1 << 20

# Allocates and frees 128 MiB of 600-byte buffers (past pymalloc's 512-byte limit, so
# malloc serves them), with one buffer allocated after them still alive so glibc cannot
# give the space back from the top of its heap; prints malloc_stats at each stage.
HOLD_AND_FREE = """
import json
from enduro.observability.process_memory import malloc_stats

def stats():
    s = malloc_stats()
    return [s.allocator, s.allocated_bytes, s.held_bytes]

start = stats()
held = [bytearray(600) for _ in range(128 * 1024 * 1024 // 600)]
pin = bytearray(600)
holding = stats()
del held
print(json.dumps({"start": start, "holding": holding, "freed": stats()}))
"""


def run_hold_and_free(allocator: str, **env: str) -> dict[str, list[int | str]]:
    out: dict[str, list[int | str]] = run_json_script(HOLD_AND_FREE, allocator, env=env)
    return out


def assert_allocated_then_held(stages: dict[str, list[int | str]], allocator: str) -> None:
    (name0, allocated0, held0), (name1, allocated1, _), (name2, allocated2, held2) = (
        stages["start"],
        stages["holding"],
        stages["freed"],
    )
    assert name0 == name1 == name2 == allocator
    assert isinstance(allocated0, int) and isinstance(allocated1, int)
    assert isinstance(allocated2, int) and isinstance(held0, int) and isinstance(held2, int)
    # Each buffer costs its 600 bytes plus the allocator's rounding and headers.
    assert 128 * MIB <= allocated1 - allocated0 <= 160 * MIB
    assert abs(allocated2 - allocated0) < 8 * MIB
    # What the callers freed, the allocator still holds (jemalloc: decay off; glibc: the
    # live buffer on top pins the heap).
    assert held2 - held0 >= 120 * MIB


def test_jemalloc_reports_allocated_and_held() -> None:
    stages = run_hold_and_free("jemalloc", MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    assert_allocated_then_held(stages, "jemalloc")


def test_glibc_reports_allocated_and_held() -> None:
    assert_allocated_then_held(run_hold_and_free("glibc"), "glibc")


def test_this_process_reads_both_figures() -> None:
    stats = malloc_stats()
    memory = anon_memory_bytes()
    assert stats is not None and memory is not None
    assert stats.allocator == "glibc"  # the test runner is not preloaded
    assert 0 < stats.allocated_bytes < memory
    assert stats.held_bytes >= 0
