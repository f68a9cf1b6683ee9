import pytest

from enduro.server import allocator
from enduro.server.allocator import engine_environment, resolve_allocator
from tests.allocator_script import run_json_script


def test_glibc_keeps_the_environment_as_it_is() -> None:
    env = engine_environment("glibc", {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
    assert env == {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}


def test_jemalloc_is_preloaded_in_front_of_other_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "/lib/libjemalloc.so.2")
    env = engine_environment("jemalloc", {"LD_PRELOAD": "/lib/other.so"})
    assert env == {
        "LD_PRELOAD": "/lib/libjemalloc.so.2:/lib/other.so",
        "MALLOC_CONF": "dirty_decay_ms:-1",
    }
    assert resolve_allocator("auto") == "jemalloc"
    # An operator's own options come after the engine's, so they win.
    env = engine_environment("jemalloc", {"MALLOC_CONF": "dirty_decay_ms:5000"})
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,dirty_decay_ms:5000"


# Allocates and frees a 16 MiB tensor 40 times; prints the page faults per round.
FAULTS_SCRIPT = """
import json, resource, torch
source = torch.ones(4 * 2**20)
(source * 2).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    doubled = source * 2
    del doubled
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps((after - before) / 40))
"""


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="jemalloc is not installed")
def test_the_engines_jemalloc_reuses_freed_large_buffers() -> None:
    # With jemalloc's default decay, a freed 16 MiB buffer is purged at once and the next one
    # faults in all 4,096 of its pages again: what a decode step's logits did at every step.
    with_decay = run_json_script(
        FAULTS_SCRIPT, "jemalloc", env={"MALLOC_CONF": "dirty_decay_ms:10000"}
    )
    assert with_decay >= 4096
    assert run_json_script(FAULTS_SCRIPT, "jemalloc") < 16


def test_auto_falls_back_to_glibc_and_jemalloc_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert resolve_allocator("auto") == "glibc"
    with pytest.raises(ValueError, match="libjemalloc2"):
        engine_environment("jemalloc", {})
    with pytest.raises(ValueError, match="allocator must be one of"):
        resolve_allocator("tcmalloc")
