"""When the engine hands the allocator's freed pages back to the kernel.

The engine's jemalloc keeps freed pages for reuse (server/allocator.py, JEMALLOC_CONF): a
decode step frees and allocates the same large buffers every time, and purging them between
steps made each step fault them in again. Kept pages are memory the process holds without
using, though, so the engine purges them itself: once after it has been idle for
IDLE_PURGE_AFTER (nothing will reuse them soon), and every BUSY_PURGE_INTERVAL under load,
so the pages of a rare large step (a long prompt's prefill chunk) are not held for good.
A purge under load costs one step's worth of page faults (≈40 ms at 16 streams) per interval.
"""

from collections.abc import Callable

IDLE_PURGE_AFTER = 5.0
"""Seconds without work before the engine purges."""
BUSY_PURGE_INTERVAL = 30.0
"""Seconds between purges while there is work."""


class PagePurger:
    """Decides, between steps, whether to purge; `purge` does it (None: no allocator to ask,
    as under glibc, whose freed memory the guard's collect rung trims instead)."""

    def __init__(self, purge: Callable[[], bool | None] | None, now: float) -> None:
        self.purge = purge
        self.last_purge = now
        self.last_busy = now
        self.busy_since: float | None = None  # when the current stretch of work began
        self.purged_since_busy = False
        self.num_purges = 0

    def maybe_purge(self, now: float, busy: bool) -> bool:
        """Purges if it is time; returns whether it purged."""
        if self.purge is None:
            return False
        if busy:
            if self.busy_since is None:
                self.busy_since = now
            self.last_busy = now
            self.purged_since_busy = False
            # Counted from the later of the last purge and the start of this work: the first
            # step after a long idle stretch has nothing to give back yet.
            due = now - max(self.last_purge, self.busy_since) >= BUSY_PURGE_INTERVAL
        else:
            self.busy_since = None
            due = not self.purged_since_busy and now - self.last_busy >= IDLE_PURGE_AFTER
        if not due:
            return False
        self.purge()
        self.last_purge = now
        self.purged_since_busy = not busy
        self.num_purges += 1
        return True
