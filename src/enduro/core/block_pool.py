"""The pool of fixed-size KV blocks: ref counts, the prefix-hash map, and free-block order.

Every block is in exactly one state:
- used: ref_cnt > 0 (some request's block table names it);
- cached: ref_cnt == 0 but it holds a full block of known tokens (block_hash is set), so a
  later request with the same prefix can take it back; evicted least recently used first;
- free: ref_cnt == 0 and no hash.
New blocks come from the lowest free block id, so live data stays packed at the start of the
pool; only when no free block is left is the least recently used cached block evicted.

Fragmentation is measured over segments: the share of unreferenced blocks (free or cached)
that sit in a segment which also holds a used block, memory that releasing whole segments
could not give back. The pool is not cut into segments yet (the elastic pool will make them
real), so it is read as if cut into NOTIONAL_SEGMENT_BLOCKS-block segments from block 0.
"""

import heapq
from collections import OrderedDict
from dataclasses import dataclass

BlockHash = bytes
NOTIONAL_SEGMENT_BLOCKS = 64


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self._free_ids = list(range(num_blocks))  # a min-heap of free block ids
        # Cached blocks with ref_cnt 0, least recently used first.
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free ones plus evictable cached ones."""
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the cached state: unreferenced, holding a reusable prefix."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_hashed_blocks(self) -> int:
        """Entries in the prefix-hash map (used or cached)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def fragmentation(self) -> float:
        """Unreferenced blocks in segments that also hold a used block, over all unreferenced
        blocks; 0.0 when every block is used. O(num_blocks): read it per heartbeat, not per
        step."""
        if self.num_free_blocks == 0:
            return 0.0
        num_stranded = 0
        for start in range(0, self.num_blocks, NOTIONAL_SEGMENT_BLOCKS):
            segment = self.blocks[start : start + NOTIONAL_SEGMENT_BLOCKS]
            num_used = sum(1 for block in segment if block.ref_cnt > 0)
            if num_used:
                num_stranded += len(segment) - num_used
        return num_stranded / self.num_free_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling unreferenced ones out of the LRU."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._evictable[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Blocks with ref_cnt 1, lowest free ids first, then evicting the LRU cached ones."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot take {num_blocks} blocks, {self.num_free_blocks} free")
        taken = []
        for _ in range(num_blocks):
            block = self._take_one()
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def _take_one(self) -> KVBlock:
        if self._free_ids:
            return self.blocks[heapq.heappop(self._free_ids)]
        _, block = self._evictable.popitem(last=False)
        self._evict(block)
        return block

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block under its chained hash so later requests can reuse it.

        If another block already holds the same content (two requests computed it at once),
        the first one stays the cached copy and this one is freed normally later.
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each; pass a request's blocks tail first so its prefix
        blocks, which other requests are likelier to share, are evicted last."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            if block.block_hash is not None:
                self._evictable[block.block_id] = block
            else:
                heapq.heappush(self._free_ids, block.block_id)

    def reset_prefix_cache(self) -> int:
        """Evict every unreferenced cached block; returns how many were evicted."""
        evicted = 0
        while self._evictable:
            _, block = self._evictable.popitem(last=False)
            self._evict(block)
            heapq.heappush(self._free_ids, block.block_id)
            evicted += 1
        return evicted
