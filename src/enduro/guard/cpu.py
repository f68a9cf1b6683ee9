"""How long a process's threads waited for a CPU: the sign of contention from outside.

A latency rise has two very different causes. The engine itself got slower (a cache that
grew, a fragmented pool, a leak): the guard's ladder can repair that. Or something else on
the machine took the CPUs: the engine's threads then sit in the kernel's run queue instead
of running, and trimming caches or recycling the worker cannot help — a recycle even makes
it worse, since the new worker starts with an empty prefix cache. The kernel counts each
thread's run-queue wait in /proc/<pid>/task/<tid>/schedstat (second field, nanoseconds);
its rate over a window says how much CPU time per second the engine wanted and did not get.
"""

from pathlib import Path


def cpu_wait_seconds(pid: int) -> float | None:
    """Run-queue wait of all of a process's threads so far, seconds; None if unreadable.

    Cumulative per live thread: a thread that exits takes its share with it, so a rate taken
    from two readings can dip (the engine's threads live as long as the process)."""
    total_ns = 0
    try:
        tasks = list(Path("/proc", str(pid), "task").iterdir())
    except OSError:
        return None
    read = 0
    for task in tasks:
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread exited meanwhile
            continue
        if len(fields) >= 2:
            total_ns += int(fields[1])
            read += 1
    return total_ns / 1e9 if read else None
