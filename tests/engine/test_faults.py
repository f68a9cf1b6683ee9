"""Planted faults: the leak is real memory, counted, and kept when the fault is disarmed
(a fix stops a leak; it does not give back what leaked)."""

from enduro.core.kv_cache_manager import KVCacheManager
from enduro.engine.faults import Faults, FaultSettings
from enduro.request import Request
from enduro.sampling_params import SamplingParams


def test_leaked_bytes_count_every_finished_request_and_survive_disarming() -> None:
    manager = KVCacheManager(16, block_size=4)
    faults = Faults()
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=1))
    faults.on_finished(request, manager)
    assert faults.leaked_bytes == 0
    faults.arm(FaultSettings(leak_bytes_per_request=4096), manager)
    for _ in range(3):
        faults.on_finished(request, manager)
    assert faults.leaked_bytes == 3 * 4096
    faults.arm(FaultSettings(), manager)
    faults.on_finished(request, manager)
    assert faults.leaked_bytes == 3 * 4096
