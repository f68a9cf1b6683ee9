"""Which blocks each request holds, prefix-cache lookups, and slot allocation."""

import hashlib
from array import array

from enduro.core.block_pool import BlockHash, BlockPool, KVBlock, PoolLayout, cdiv
from enduro.request import Request


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Chained block hash: equal hashes mean equal tokens in this block and every block before.

    A cryptographic hash, because a collision would let one request read another's KV.
    """
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class KVCacheManager:
    def __init__(
        self, layout: PoolLayout | int, block_size: int, enable_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(layout, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self._req_to_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def enable_caching(self) -> bool:
        return self.block_pool.enable_caching

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request as (blocks, number of tokens).

        At least one token is always left to compute: its logits pick the next token.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
    ) -> list[int] | None:
        """Room for `num_new_tokens` more tokens after the computed ones.

        Returns the ids of newly allocated blocks, or None (and changes nothing) when the
        pool has too few free blocks.
        """
        computed = new_computed_blocks or []
        held = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        num_needed = (
            cdiv(num_computed + num_new_tokens, self.block_size) - len(held) - len(computed)
        )
        # Hits with ref_cnt 0 are counted as free now but stop being free once touched.
        num_touched_free = sum(1 for block in computed if block.ref_cnt == 0)
        if num_needed > self.block_pool.num_available_blocks - num_touched_free:
            if not held:
                del self.req_to_blocks[request.request_id]
            return None
        self.block_pool.touch(computed)
        held.extend(computed)
        new_blocks = self.block_pool.get_new_blocks(max(num_needed, 0))
        held.extend(new_blocks)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return [block.block_id for block in new_blocks]

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        for index in range(start, num_full):
            self.block_pool.cache_block(blocks[index], hashes[index])
        self._num_cached_blocks[request.request_id] = num_full

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended as tokens are generated."""
        hashes = self._req_to_hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        for index in range(len(hashes), num_full):
            start = index * self.block_size
            tokens = request.token_ids(start, start + self.block_size)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
        return hashes

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first; safe to call twice."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(list(reversed(blocks)))
        self._num_cached_blocks.pop(request.request_id, None)
        self._req_to_hashes.pop(request.request_id, None)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- compaction and invariants ----------------------------------------------------------

    def compact(self, max_moves: int) -> list[tuple[int, int]]:
        """Move up to `max_moves` live blocks into lower free blocks so whole segments empty
        out; block tables are updated here, the KV data must be copied by the caller before
        the next step. Returns the (src, dst) moves."""
        moves = self.block_pool.move_blocks(self.block_pool.compaction_sources()[:max_moves])
        if moves:
            blocks = self.block_pool.blocks
            moved = dict(moves)
            for held in self.req_to_blocks.values():
                for index, block in enumerate(held):
                    if block.block_id in moved:
                        held[index] = blocks[moved[block.block_id]]
        return moves

    def check_invariants(self) -> list[str]:
        """Broken invariants of the pool, in words; empty when healthy. O(blocks)."""
        pool = self.block_pool
        problems = []
        counted = pool.num_used_blocks + pool.num_cached_blocks + pool.num_free_blocks
        if counted != pool.num_blocks:
            problems.append(
                f"used + cached + free = {counted} blocks, the pool has {pool.num_blocks}"
            )
        holders: dict[int, int] = {}
        for held in self.req_to_blocks.values():
            for block in held:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
        orphans = [b.block_id for b in pool.blocks if b.ref_cnt > holders.get(b.block_id, 0)]
        if orphans:
            problems.append(
                f"{len(orphans)} blocks hold references no live request accounts for "
                f"(first: block {orphans[0]})"
            )
        if pool.num_hashed_blocks > pool.num_blocks:
            problems.append(
                f"the prefix-hash map has {pool.num_hashed_blocks} entries for "
                f"{pool.num_blocks} blocks"
            )
        return problems
