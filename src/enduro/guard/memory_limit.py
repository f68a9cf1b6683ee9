"""How many bytes the server may use: the configured figure, the cgroup's, or the machine's."""

from pathlib import Path

CGROUP_V2_MAX = "sys/fs/cgroup/memory.max"
CGROUP_V1_LIMIT = "sys/fs/cgroup/memory/memory.limit_in_bytes"
MEMINFO = "proc/meminfo"
CGROUP_V1_UNLIMITED = 1 << 60
"""cgroup v1 reports "no limit" as a huge page-aligned number (about 2**63), not a word."""


def memory_limit_bytes(configured: int | None, *, root: Path = Path("/")) -> int | None:
    """The first of: configured, the cgroup v2 limit, the cgroup v1 limit, MemTotal.

    An unlimited or unreadable source falls through to the next; None when none is known.
    `root` is where the file system starts, so tests can build a fake tree.
    """
    if configured is not None:
        return configured
    for read in (_cgroup_v2_limit, _cgroup_v1_limit, _mem_total):
        limit = read(root)
        if limit is not None:
            return limit
    return None


def _cgroup_v2_limit(root: Path) -> int | None:
    text = _read(root / CGROUP_V2_MAX)
    if text is None or text == "max":
        return None
    return _positive_int(text)


def _cgroup_v1_limit(root: Path) -> int | None:
    text = _read(root / CGROUP_V1_LIMIT)
    limit = None if text is None else _positive_int(text)
    if limit is None or limit >= CGROUP_V1_UNLIMITED:
        return None
    return limit


def _mem_total(root: Path) -> int | None:
    """MemTotal from /proc/meminfo, a line like "MemTotal:       16318412 kB"."""
    text = _read(root / MEMINFO)
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        if name == "MemTotal":
            kib = _positive_int(value.strip().removesuffix("kB"))
            return None if kib is None else kib * 1024
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _positive_int(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None
