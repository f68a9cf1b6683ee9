import pytest

from enduro.core.block_pool import BlockPool


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
    assert pool.num_free_blocks == 3
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
    assert pool.num_free_blocks == 0
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
