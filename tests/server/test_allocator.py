import pytest

from enduro.server import allocator
from enduro.server.allocator import engine_environment, resolve_allocator


def test_glibc_keeps_the_environment_as_it_is() -> None:
    env = engine_environment("glibc", {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
    assert env == {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}


def test_jemalloc_is_preloaded_in_front_of_other_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "/lib/libjemalloc.so.2")
    env = engine_environment("jemalloc", {"LD_PRELOAD": "/lib/other.so"})
    assert env == {"LD_PRELOAD": "/lib/libjemalloc.so.2:/lib/other.so"}
    assert resolve_allocator("auto") == "jemalloc"


def test_auto_falls_back_to_glibc_and_jemalloc_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert resolve_allocator("auto") == "glibc"
    with pytest.raises(ValueError, match="libjemalloc2"):
        engine_environment("jemalloc", {})
    with pytest.raises(ValueError, match="allocator must be one of"):
        resolve_allocator("tcmalloc")
