from enduro.engine.page_purge import BUSY_PURGE_INTERVAL, IDLE_PURGE_AFTER, PagePurger


class Purge:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return True


def test_purges_once_after_going_idle() -> None:
    purge = Purge()
    purger = PagePurger(purge, now=0.0)
    assert not purger.maybe_purge(1.0, busy=True)
    assert not purger.maybe_purge(1.0 + IDLE_PURGE_AFTER - 0.1, busy=False)
    assert purger.maybe_purge(1.0 + IDLE_PURGE_AFTER, busy=False)
    # Still idle: nothing new was freed since, so no second purge.
    assert not purger.maybe_purge(1.0 + 10 * IDLE_PURGE_AFTER, busy=False)
    assert (purge.calls, purger.num_purges) == (1, 1)
    # Work again, then idle again: one more.
    assert not purger.maybe_purge(100.0, busy=True)
    assert purger.maybe_purge(100.0 + IDLE_PURGE_AFTER, busy=False)
    assert (purge.calls, purger.num_purges) == (2, 2)


def test_purges_on_an_interval_under_load() -> None:
    purge = Purge()
    purger = PagePurger(purge, now=0.0)
    times = [0.5 * i for i in range(int(3 * BUSY_PURGE_INTERVAL / 0.5) + 1)]
    purged_at = [t for t in times if purger.maybe_purge(t, busy=True)]
    assert purged_at == [BUSY_PURGE_INTERVAL, 2 * BUSY_PURGE_INTERVAL, 3 * BUSY_PURGE_INTERVAL]
    # Going idle right after a busy purge still purges once the idle wait is over.
    last = purged_at[-1]
    assert not purger.maybe_purge(last + 1.0, busy=False)
    assert purger.maybe_purge(last + IDLE_PURGE_AFTER, busy=False)
    assert purge.calls == 4


def test_without_an_allocator_to_ask_it_never_purges() -> None:
    purger = PagePurger(None, now=0.0)
    assert not purger.maybe_purge(1000.0, busy=False)
    assert not purger.maybe_purge(2000.0, busy=True)
    assert purger.num_purges == 0
