import os
import subprocess
import sys
import time

from enduro.guard.cpu import cpu_wait_seconds

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def spin_wait_rate(seconds: float) -> float:
    """Spins this thread for `seconds`; its process's run-queue wait per second meanwhile."""
    pid = os.getpid()
    before, started = cpu_wait_seconds(pid), time.monotonic()
    end = started + seconds
    while time.monotonic() < end:
        pass
    after = cpu_wait_seconds(pid)
    assert before is not None and after is not None
    return (after - before) / (time.monotonic() - started)


def test_waiting_for_a_cpu_shows_when_other_processes_take_them() -> None:
    alone = spin_wait_rate(1.0)
    # One spinning process per CPU this test may run on, plus this one: at least one of
    # the spinners is always waiting, and this thread waits about half its time.
    cpus = len(os.sched_getaffinity(0))
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=4)]) for _ in range(cpus)
    ]
    try:
        time.sleep(0.5)  # the interpreters start
        contended = spin_wait_rate(2.0)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert alone < 0.15
    assert contended > 0.25
    assert contended > alone + 0.2


def test_a_process_that_is_gone_reads_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_wait_seconds(child.pid) is None
