import pytest

from enduro.core.block_pool import BlockPool, PoolLayout


def test_new_blocks_come_from_the_lowest_free_ids() -> None:
    pool = BlockPool(6)
    first = pool.get_new_blocks(3)
    assert [b.block_id for b in first] == [0, 1, 2]
    pool.free_blocks([first[1]])
    assert [b.block_id for b in pool.get_new_blocks(2)] == [1, 3]
    assert pool.num_used_blocks == 4
    assert pool.num_free_blocks == 2


def test_cached_blocks_are_reused_by_hash_and_evicted_lru() -> None:
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, b"a")
    pool.cache_block(b, b"b")
    pool.free_blocks([b, a, c])  # b becomes least recently used, then a
    assert pool.num_cached_blocks == 2
    assert pool.num_available_blocks == 3
    assert pool.get_cached_block(b"a") is a
    # The free block goes first, then the LRU cached one (b), keeping a.
    assert [blk.block_id for blk in pool.get_new_blocks(2)] == [2, 1]
    assert pool.get_cached_block(b"b") is None
    assert pool.get_cached_block(b"a") is a
    assert pool.num_evictions == 1


def test_touch_takes_a_cached_block_out_of_the_lru() -> None:
    pool = BlockPool(2)
    a, _ = pool.get_new_blocks(2)
    pool.cache_block(a, b"a")
    pool.free_blocks([a])
    pool.touch([a])
    assert a.ref_cnt == 1
    assert pool.num_available_blocks == 0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_duplicate_content_keeps_the_first_cached_copy() -> None:
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, b"x")
    pool.cache_block(b, b"x")
    assert b.block_hash is None
    assert pool.num_hashed_blocks == 1


def test_double_free_is_refused() -> None:
    pool = BlockPool(1)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(ValueError):
        pool.free_blocks([a])


def test_reset_prefix_cache_frees_unreferenced_cached_blocks() -> None:
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, b"a")
    pool.cache_block(b, b"b")
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.num_hashed_blocks == 1
    assert pool.num_cached_blocks == 0
    assert pool.num_free_blocks == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elastic_pool(max_blocks: int = 16, segment: int = 4, initial: int = 1) -> BlockPool:
    return BlockPool(PoolLayout(max_blocks, segment, initial), clock=FakeClock())


def test_the_pool_grows_a_segment_at_a_time_from_the_lowest_unallocated() -> None:
    pool = elastic_pool()
    assert (pool.num_segments, pool.num_blocks, pool.max_num_blocks) == (1, 4, 16)
    assert pool.grown_segments == [0]
    blocks = pool.get_new_blocks(5)
    assert [b.block_id for b in blocks] == [0, 1, 2, 3, 4]
    assert (pool.num_segments, pool.num_free_blocks, pool.num_available_blocks) == (2, 3, 11)
    assert pool.grown_segments == [0, 1]
    with pytest.raises(ValueError):
        pool.get_new_blocks(12)


def test_fragmentation_counts_free_blocks_beside_live_ones() -> None:
    pool = elastic_pool()
    blocks = pool.get_new_blocks(9)  # segments 0, 1, 2 allocated; 2 holds block 8
    assert pool.fragmentation == 3 / 3  # the three free blocks share segment 2 with block 8
    pool.free_blocks(blocks[4:8])  # segment 1 empties
    assert pool.fragmentation == 3 / 7
    pool.cache_block(blocks[0], b"a")
    pool.free_blocks([blocks[0]])  # cached blocks are live: segment 0 still holds data
    assert pool.fragmentation == 3 / 7
    assert pool.num_reclaimable_segments == 0  # 5 live blocks: 2 segments + 1 of headroom


def test_compaction_moves_live_blocks_down_and_empties_high_segments() -> None:
    pool = elastic_pool(max_blocks=16, segment=4)
    blocks = pool.get_new_blocks(16)
    pool.cache_block(blocks[14], b"x")
    pool.free_blocks([*blocks[:13], blocks[14]])  # live: 13 (used), 14 (cached), 15 (used)
    assert pool.compaction_sources() == [15, 14, 13]
    assert pool.move_blocks(pool.compaction_sources()) == [(15, 0), (14, 1), (13, 2)]
    assert [(b.ref_cnt, b.block_hash) for b in pool.blocks[:3]] == [(1, None), (0, b"x"), (1, None)]
    assert pool.get_cached_block(b"x") is pool.blocks[1]
    assert pool.release_empty_segments() == [1, 2, 3]
    assert (pool.num_segments, pool.num_used_blocks, pool.num_cached_blocks) == (1, 2, 1)
    assert pool.num_segments_released == 3


def test_idle_segments_are_released_only_after_the_idle_time() -> None:
    pool = elastic_pool()
    clock = pool.clock
    assert isinstance(clock, FakeClock)
    blocks = pool.get_new_blocks(8)
    pool.free_blocks(blocks[4:])
    clock.now += 59
    assert pool.release_empty_segments(60) == []
    clock.now += 1
    assert pool.release_empty_segments(60) == [1]
    assert pool.release_empty_segments(0) == []  # segment 0 is the initial size: kept


def test_the_prefix_cache_cap_evicts_least_recently_used_blocks() -> None:
    pool = BlockPool(PoolLayout(8, 8, 1, max_cached_blocks=2))
    blocks = pool.get_new_blocks(3)
    for block, name in zip(blocks, (b"a", b"b", b"c"), strict=True):
        pool.cache_block(block, name)
    pool.free_blocks(blocks)
    assert pool.num_cached_blocks == 2
    assert pool.get_cached_block(b"a") is None
    assert pool.trim_prefix_cache(1) == 1
    assert pool.get_cached_block(b"c") is blocks[2]
