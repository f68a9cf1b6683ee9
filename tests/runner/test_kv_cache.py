import torch

from enduro.observability.process_memory import anon_memory_bytes
from enduro.runner.kv_cache import KVCache

MIB = 1 << 20


def big_cache(max_num_blocks: int = 64, segment_blocks: int = 16) -> KVCache:
    # 512 KiB a block, 8 MiB a segment: large enough to see in process memory.
    return KVCache(
        4, max_num_blocks, segment_blocks, 16, 8, 128, torch.float32, torch.device("cpu")
    )


def test_committed_segments_are_resident_and_released_ones_are_given_back() -> None:
    before = anon_memory_bytes()
    cache = big_cache()
    assert before is not None and cache.bytes_per_segment == 8 * MIB
    reserved = anon_memory_bytes()
    assert reserved is not None and reserved - before < 2 * MIB  # reserved, not resident
    for segment in range(4):
        cache.commit_segment(segment)
    committed = anon_memory_bytes()
    assert committed is not None and 0.95 * 32 * MIB < committed - reserved < 1.05 * 32 * MIB
    for segment in (1, 2, 3):
        cache.release_segment(segment)
    released = anon_memory_bytes()
    assert released is not None and 0.95 * 24 * MIB < committed - released < 1.05 * 24 * MIB


def test_a_released_segment_reads_as_zeros_and_its_neighbours_are_untouched() -> None:
    cache = big_cache(max_num_blocks=48, segment_blocks=16)
    for segment in range(3):
        cache.commit_segment(segment)
    for k, v in cache.layers:
        k.fill_(1.0)
        v.fill_(2.0)
    cache.release_segment(1)
    for k, v in cache.layers:
        assert torch.all(k[16:32] == 0) and torch.all(v[16:32] == 0)
        assert torch.all(k[:16] == 1) and torch.all(k[32:] == 1)
        assert torch.all(v[:16] == 2) and torch.all(v[32:] == 2)


def test_copy_blocks_moves_every_layer() -> None:
    cache = KVCache(2, 8, 4, 2, 1, 4, torch.float32, torch.device("cpu"))
    for layer, (k, v) in enumerate(cache.layers):
        k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k) + layer)
        v.copy_(-k)
    expected = [(k[7].clone(), k[5].clone()) for k, _ in cache.layers]
    cache.copy_blocks([(7, 0), (5, 1)])
    for (k, v), (seven, five) in zip(cache.layers, expected, strict=True):
        assert torch.equal(k[0], seven) and torch.equal(k[1], five)
        assert torch.equal(v[0], -seven)
