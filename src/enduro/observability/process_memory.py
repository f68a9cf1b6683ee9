"""Two memory figures per process, cheap enough to read at every scrape and heartbeat.

- Process memory: RssAnon + VmSwap from /proc/<pid>/status. RSS alone counts file-backed
  pages (the mapped weights, shared libraries) that the kernel can drop at will; anonymous
  memory, resident or swapped out, is what a leak grows.
- Python heap: the bytes in live blocks of CPython's small-object allocator (pymalloc), which
  holds every object of at most 512 bytes: the dicts, lists, strings, ints and instances that
  make up Python-level state. A leak of Python objects shows here first; large buffers
  (tensors, big arrays) come from malloc and show only in process memory. Read through
  `_PyObject_DebugMallocStats` into an in-memory stream: a walk over pymalloc's arenas
  (well under a millisecond), not over objects.
- Allocator figures (`malloc_stats`): what malloc's callers hold vs what malloc keeps.
"""

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

_STATUS_FIELDS = ("RssAnon:", "VmSwap:")
_ALLOCATED = re.compile(rb"^# bytes in allocated blocks\s*=\s*([\d,]+)\s*$", re.MULTILINE)


def anon_memory_bytes(pid: int | None = None) -> int | None:
    """RssAnon + VmSwap of a process (this one by default); None if it is gone or unreadable."""
    path = Path("/proc", str(pid if pid is not None else os.getpid()), "status")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    total, seen = 0, 0
    for line in lines:
        if line.startswith(_STATUS_FIELDS):
            total += int(line.split()[1]) * 1024  # "RssAnon:   123 kB"
            seen += 1
    return total if seen == len(_STATUS_FIELDS) else None


class _MallocStats:
    """ctypes handles for printing pymalloc's statistics into a memory buffer."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)  # the symbols already loaded: libc among them
        self.open_memstream = libc.open_memstream
        self.open_memstream.restype = ctypes.c_void_p
        self.open_memstream.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        self.fclose = libc.fclose
        self.fclose.argtypes = [ctypes.c_void_p]
        self.free = libc.free
        self.free.argtypes = [ctypes.c_void_p]
        # pythonapi holds the GIL during the call, which pymalloc's state needs.
        self.print_stats = ctypes.pythonapi._PyObject_DebugMallocStats
        self.print_stats.argtypes = [ctypes.c_void_p]
        self.print_stats.restype = ctypes.c_int

    def text(self) -> bytes | None:
        buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
        stream = self.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
        if not stream:
            return None
        try:
            printed = self.print_stats(stream)
        finally:
            self.fclose(stream)  # sets buffer and size
        try:
            if not printed or buffer.value is None:
                return None
            return ctypes.string_at(buffer.value, size.value)
        finally:
            self.free(buffer)


@functools.cache
def _malloc_stats() -> _MallocStats | None:
    try:
        return _MallocStats()
    except (OSError, AttributeError, TypeError):  # no libc stream, or no such symbol
        return None


def python_heap_bytes() -> int | None:
    """Bytes in pymalloc's allocated blocks; None where that cannot be read (no pymalloc,
    e.g. PYTHONMALLOC=malloc, or a build without the symbol)."""
    stats = _malloc_stats()
    text = stats.text() if stats is not None else None
    match = _ALLOCATED.search(text) if text else None
    return int(match.group(1).replace(b",", b"")) if match else None


@dataclass(frozen=True)
class MallocStats:
    """What the C allocator of this process says about its heap.

    A process's anonymous memory is what malloc's callers hold (`allocated_bytes`) plus what
    malloc keeps after they freed it (`held_bytes`: free chunks glibc cannot return, dirty
    pages jemalloc has not purged yet, and its metadata). Growth in the first is live memory,
    a leak or a cache; growth in the second is the allocator's retention, which a purge or
    a trim gives back. Reading both is how the guard and the soak tell the two apart.
    """

    allocator: str
    """"jemalloc" or "glibc"."""
    allocated_bytes: int
    held_bytes: int


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33+): every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def jemalloc_mallctl() -> "ctypes._NamedFuncPointer | None":
    try:
        mallctl = ctypes.CDLL(None).mallctl  # present only when jemalloc is loaded
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    mallctl.restype = ctypes.c_int
    return mallctl


# jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena.
_JEMALLOC_PURGE_ALL = b"arena.4096.purge"


def jemalloc_purge() -> bool | None:
    """Hands every jemalloc arena's freed (dirty) pages back to the kernel; whether it worked,
    or None when jemalloc is not the allocator."""
    mallctl = jemalloc_mallctl()
    if mallctl is None:
        return None
    return bool(mallctl(_JEMALLOC_PURGE_ALL, None, None, None, 0) == 0)


@functools.cache
def _glibc_mallinfo2() -> "ctypes._NamedFuncPointer | None":
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    mallinfo2.argtypes = []
    mallinfo2.restype = _MallInfo2
    return mallinfo2


def _jemalloc_size(mallctl: "ctypes._NamedFuncPointer", name: bytes) -> int | None:
    value, size = ctypes.c_size_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    if mallctl(name, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value


def malloc_stats() -> MallocStats | None:
    """This process's allocator figures; None where neither jemalloc nor glibc's mallinfo2
    answers. Cheap (jemalloc sums per-arena counters, glibc walks its arenas' bin heads)."""
    mallctl = jemalloc_mallctl()
    if mallctl is not None:
        # jemalloc's statistics are a snapshot refreshed by writing to "epoch".
        epoch = ctypes.c_uint64(1)
        if mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch)) != 0:
            return None
        allocated = _jemalloc_size(mallctl, b"stats.allocated")
        resident = _jemalloc_size(mallctl, b"stats.resident")
        if allocated is None or resident is None:  # built with --disable-stats
            return None
        return MallocStats("jemalloc", allocated, max(resident - allocated, 0))
    mallinfo2 = _glibc_mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    # uordblks: in use in the arenas; hblkhd: blocks mmapped on their own (large ones);
    # fordblks: free chunks the arenas keep, an upper bound of what is resident (glibc hands
    # the pages of some large free chunks back while keeping the chunk, and an untouched top
    # chunk has none).
    return MallocStats("glibc", info.uordblks + info.hblkhd, info.fordblks)
