from enduro.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from enduro.request import Request
from enduro.sampling_params import SamplingParams


def _request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=4))


def test_block_hashes_chain() -> None:
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(None, [1, 2]) == first


def test_allocate_slots_returns_new_block_ids_or_none() -> None:
    manager = KVCacheManager(layout=4, block_size=4)
    request = _request("a", list(range(10)))
    assert manager.allocate_slots(request, 10) == [0, 1, 2]
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2) == []  # position 10, 11 fit in block 2
    assert manager.allocate_slots(request, 3) == [3]
    other = _request("b", list(range(4)))
    assert manager.allocate_slots(other, 4) is None
    assert manager.block_ids("b") == []
    assert "b" not in manager.req_to_blocks


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token() -> None:
    manager = KVCacheManager(layout=8, block_size=4)
    first = _request("a", list(range(8)))
    assert manager.allocate_slots(first, 8) == [0, 1]
    manager.free(first)
    # The whole 8-token prompt is cached, but the last token must be computed: 1 block hit.
    again = _request("b", list(range(8)))
    hits, num_tokens = manager.get_computed_blocks(again)
    assert [b.block_id for b in hits] == [0]
    assert num_tokens == 4
    # Block 1 still holds a cached copy; the recomputed block takes the lowest free id.
    assert manager.allocate_slots(again, 4, hits) == [2]
    assert manager.block_ids("b") == [0, 2]
    assert manager.block_pool.num_cached_blocks == 1


def test_prefix_hit_with_longer_prompt() -> None:
    manager = KVCacheManager(layout=8, block_size=4)
    first = _request("a", list(range(9)))
    manager.allocate_slots(first, 9)
    manager.free(first)
    longer = _request("b", [*range(8), 42, 43])
    hits, num_tokens = manager.get_computed_blocks(longer)
    assert [b.block_id for b in hits] == [0, 1]
    assert num_tokens == 8


def test_prompt_logprobs_bypass_the_prefix_cache() -> None:
    manager = KVCacheManager(layout=8, block_size=4)
    first = _request("a", list(range(9)))
    manager.allocate_slots(first, 9)
    manager.free(first)
    scored = Request("b", list(range(9)), SamplingParams(prompt_logprobs=0))
    assert manager.get_computed_blocks(scored) == ([], 0)


def test_free_releases_tail_first() -> None:
    manager = KVCacheManager(layout=4, block_size=2)
    request = _request("a", [1, 2, 3, 4, 5])
    manager.allocate_slots(request, 5)
    manager.free(request)
    pool = manager.block_pool
    assert pool.num_available_blocks == 4
    assert pool.num_cached_blocks == 2  # the two full blocks stay cached
    # LRU order evicts the later block (1) before the first one (0).
    taken = pool.get_new_blocks(4)
    assert [b.block_id for b in taken] == [2, 3, 1, 0]
