from pathlib import Path

from enduro.guard.memory_limit import memory_limit_bytes

MEMINFO = "MemTotal:       16318412 kB\nMemFree:         1234567 kB\n"


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_configured_limit_wins(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory.max", "1073741824\n")
    assert memory_limit_bytes(123456, root=tmp_path) == 123456


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory.max", "1073741824\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert memory_limit_bytes(None, root=tmp_path) == 1073741824


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert memory_limit_bytes(None, root=tmp_path) == 16318412 * 1024


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert memory_limit_bytes(None, root=tmp_path) == 536870912


def test_cgroup_v1_huge_value_means_no_limit(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert memory_limit_bytes(None, root=tmp_path) == 16318412 * 1024


def test_physical_memory_without_cgroups(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert memory_limit_bytes(None, root=tmp_path) == 16318412 * 1024


def test_nothing_readable_means_unknown(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory.max", "garbage\n")
    write(tmp_path, "proc/meminfo", "MemFree: 12 kB\n")
    assert memory_limit_bytes(None, root=tmp_path) is None
