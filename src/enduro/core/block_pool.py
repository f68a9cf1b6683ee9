"""The elastic pool of fixed-size KV blocks: segments, ref counts, the prefix-hash map.

Block ids run from 0 to max_num_blocks - 1 and are cut into segments of `segment_blocks`
consecutive ids (the last may be shorter). A segment is allocated (its memory is in use) or
not; the pool starts with `initial_segments`, grows one segment at a time when no free block
is left, and releases segments that hold no data.

Every block of an allocated segment is in exactly one state:
- used: ref_cnt > 0 (some request's block table names it);
- cached: ref_cnt == 0 but it holds a full block of known tokens (block_hash is set), so a
  later request with the same prefix can take it back; evicted least recently used first;
- free: ref_cnt == 0 and no hash.
New blocks come from the lowest free block id, so live data (used or cached) stays packed at
the start of the pool; then the pool grows; only at its maximum are cached blocks evicted.

Fragmentation is the share of free blocks that sit in segments also holding live blocks:
memory that releasing whole segments cannot give back until compaction moves the live
blocks down (KVCacheManager.compact moves them; `move_block` is the bookkeeping of one move).
"""

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

BlockHash = bytes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass(frozen=True)
class PoolLayout:
    """The pool's shape in blocks, resolved from CacheConfig's byte sizes."""

    max_num_blocks: int
    segment_blocks: int
    initial_segments: int
    max_cached_blocks: int | None = None  # the prefix cache's cap; None = the whole pool

    def __post_init__(self) -> None:
        if self.max_num_blocks < 1 or self.segment_blocks < 1:
            raise ValueError("a pool needs at least one block per segment and one block")
        if not 1 <= self.initial_segments <= self.max_num_segments:
            raise ValueError("initial_segments must be in [1, max_num_segments]")

    @property
    def max_num_segments(self) -> int:
        return cdiv(self.max_num_blocks, self.segment_blocks)

    @classmethod
    def static(cls, num_blocks: int) -> "PoolLayout":
        """One segment, allocated from the start: a pool that never grows or shrinks."""
        return cls(num_blocks, num_blocks, 1)


@dataclass(frozen=True)
class SegmentState:
    index: int
    allocated: bool
    num_used: int
    num_cached: int
    num_free: int
    idle_seconds: float | None  # how long it has held no data; None if it holds some


class BlockPool:
    def __init__(
        self,
        layout: PoolLayout | int,
        enable_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(layout, int):
            layout = PoolLayout.static(layout)
        self.layout = layout
        self.enable_caching = enable_caching
        self.clock = clock
        self.segment_blocks = layout.segment_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(layout.max_num_blocks)]
        self._allocated = [False] * layout.max_num_segments
        self._num_segments = self._num_blocks = 0  # allocated ones
        self._free_ids: list[int] = []  # a min-heap of free block ids in allocated segments
        self._num_free_in: list[int] = [0] * layout.max_num_segments
        # Since when each allocated segment has been entirely free (None while it holds data).
        self._empty_since: list[float | None] = [None] * layout.max_num_segments
        # Cached blocks with ref_cnt 0, least recently used first.
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0
        self.num_segments_grown = 0
        self.num_segments_released = 0
        # Segments allocated since the runner last looked: their memory is to be committed.
        self.grown_segments: list[int] = []
        # Fault injection only: take the highest free id, scattering live data.
        self.allocate_high = False
        for segment in range(layout.initial_segments):
            self._allocate_segment(segment)
        self.num_segments_grown = 0

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def max_num_blocks(self) -> int:
        return self.layout.max_num_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks in allocated segments."""
        return self._num_blocks

    @property
    def num_segments(self) -> int:
        return self._num_segments

    @property
    def num_free_blocks(self) -> int:
        """Free blocks (neither used nor cached) in allocated segments."""
        return len(self._free_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the cached state: unreferenced, holding a reusable prefix."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks - self.num_cached_blocks

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation can take: free, evictable, and room to grow."""
        return self.max_num_blocks - self.num_used_blocks

    @property
    def num_hashed_blocks(self) -> int:
        """Entries in the prefix-hash map (used or cached)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.max_num_blocks

    @property
    def fragmentation(self) -> float:
        """Free blocks in segments that also hold live (used or cached) blocks, over all free
        blocks of allocated segments; 0.0 when none is free."""
        if not self._free_ids:
            return 0.0
        stranded = sum(
            self._num_free_in[s]
            for s, on in enumerate(self._allocated)
            if on and self._num_free_in[s] < self._segment_size(s)
        )
        return stranded / len(self._free_ids)

    @property
    def num_reclaimable_segments(self) -> int:
        """Allocated segments beyond what the live blocks need (and the initial size): what
        compaction could give back."""
        return max(0, self.num_segments - self._num_segments_to_keep())

    def _num_segments_to_keep(self) -> int:
        """Segments the live blocks need, plus one of headroom so that a pool hovering at a
        segment boundary does not release and regrow it over and over; never below the
        initial size."""
        num_live = self.num_used_blocks + self.num_cached_blocks
        return max(self.layout.initial_segments, cdiv(num_live, self.segment_blocks) + 1)

    def segment_of(self, block_id: int) -> int:
        return block_id // self.segment_blocks

    def _segment_size(self, segment: int) -> int:
        start = segment * self.segment_blocks
        return min(self.segment_blocks, self.max_num_blocks - start)

    def _segment_ids(self, segment: int) -> range:
        start = segment * self.segment_blocks
        return range(start, start + self._segment_size(segment))

    # ---- free ids ----------------------------------------------------------------------------

    def _push_free(self, block_id: int) -> None:
        heapq.heappush(self._free_ids, block_id)
        segment = self.segment_of(block_id)
        self._num_free_in[segment] += 1
        if self._num_free_in[segment] == self._segment_size(segment):
            self._empty_since[segment] = self.clock()

    def _pop_free(self) -> KVBlock:
        if self.allocate_high:
            block_id = max(self._free_ids)
            self._free_ids.remove(block_id)
            heapq.heapify(self._free_ids)
        else:
            block_id = heapq.heappop(self._free_ids)
        segment = self.segment_of(block_id)
        self._num_free_in[segment] -= 1
        self._empty_since[segment] = None
        return self.blocks[block_id]

    # ---- segments ----------------------------------------------------------------------------

    def _allocate_segment(self, segment: int) -> None:
        self._allocated[segment] = True
        self._num_segments += 1
        self._num_blocks += self._segment_size(segment)
        self.num_segments_grown += 1
        self.grown_segments.append(segment)
        for block_id in self._segment_ids(segment):
            self._push_free(block_id)

    def _grow(self) -> bool:
        """Allocate the lowest unallocated segment; False at the maximum."""
        for segment, on in enumerate(self._allocated):
            if not on:
                self._allocate_segment(segment)
                return True
        return False

    def release_empty_segments(self, min_idle_seconds: float = 0.0) -> list[int]:
        """Release allocated segments above the initial ones that have held no data for at
        least `min_idle_seconds`; returns their indices (the caller frees their memory)."""
        now = self.clock()
        released = []
        for segment in range(self.layout.initial_segments, len(self._allocated)):
            since = self._empty_since[segment]
            if self._allocated[segment] and since is not None and now - since >= min_idle_seconds:
                released.append(segment)
        if released:
            gone = set(released)
            self._free_ids = [i for i in self._free_ids if self.segment_of(i) not in gone]
            heapq.heapify(self._free_ids)
            for segment in released:
                self._allocated[segment] = False
                self._num_segments -= 1
                self._num_blocks -= self._segment_size(segment)
                self._num_free_in[segment] = 0
                self._empty_since[segment] = None
            self.num_segments_released += len(released)
        return released

    def segment_states(self) -> list[SegmentState]:
        now = self.clock()
        states = []
        for segment, on in enumerate(self._allocated):
            ids = self._segment_ids(segment)
            used = sum(1 for i in ids if self.blocks[i].ref_cnt > 0) if on else 0
            cached = sum(1 for i in ids if i in self._evictable) if on else 0
            since = self._empty_since[segment]
            states.append(
                SegmentState(
                    segment,
                    on,
                    used,
                    cached,
                    self._num_free_in[segment],
                    now - since if since is not None else None,
                )
            )
        return states

    # ---- allocation --------------------------------------------------------------------------

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling unreferenced ones out of the LRU."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._evictable[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Blocks with ref_cnt 1: lowest free ids first, then a new segment, then evicting
        the least recently used cached blocks."""
        if num_blocks > self.num_available_blocks:
            raise ValueError(f"cannot take {num_blocks} blocks, {self.num_available_blocks} left")
        taken = []
        for _ in range(num_blocks):
            block = self._take_one()
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def _take_one(self) -> KVBlock:
        if self._free_ids or self._grow():
            return self._pop_free()
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
                self._push_free(block.block_id)
        cap = self.layout.max_cached_blocks
        if cap is not None and len(self._evictable) > cap:
            self.trim_prefix_cache(cap)

    def trim_prefix_cache(self, keep: int = 0) -> int:
        """Evict least recently used cached blocks until at most `keep` remain; returns how
        many were evicted."""
        evicted = 0
        while len(self._evictable) > keep:
            _, block = self._evictable.popitem(last=False)
            self._evict(block)
            self._push_free(block.block_id)
            evicted += 1
        return evicted

    def reset_prefix_cache(self) -> int:
        """Evict every unreferenced cached block; returns how many were evicted."""
        return self.trim_prefix_cache(0)

    # ---- compaction --------------------------------------------------------------------------

    def compaction_sources(self) -> list[int]:
        """Ids of live blocks outside the lowest allocated segments that can hold all live
        blocks (plus one segment of headroom), highest first: what compaction must move for
        segments to be released."""
        keep = self._num_segments_to_keep()
        allocated = [s for s, on in enumerate(self._allocated) if on]
        vacate = allocated[keep:]
        return [
            block_id
            for segment in reversed(vacate)
            for block_id in reversed(self._segment_ids(segment))
            if self.blocks[block_id].ref_cnt > 0 or block_id in self._evictable
        ]

    def move_blocks(self, src_ids: list[int]) -> list[tuple[int, int]]:
        """Give each live block's state to the lowest free block below it and free the
        source, stopping at the first that has no lower free block. Returns the (src, dst)
        moves made: the caller copies the KV data and fixes block tables."""
        moves: list[tuple[int, int]] = []
        for src_id in src_ids:
            if not self._free_ids or self._free_ids[0] >= src_id:
                break
            src = self.blocks[src_id]
            dst = self._pop_free()
            dst.ref_cnt, dst.block_hash = src.ref_cnt, src.block_hash
            if dst.block_hash is not None and self._cached.get(dst.block_hash) is src:
                self._cached[dst.block_hash] = dst
            src.ref_cnt, src.block_hash = 0, None
            moves.append((src_id, dst.block_id))
        moved = dict(moves)
        if any(src_id in self._evictable for src_id in moved):
            # Moved cached blocks keep their place in the LRU order.
            self._evictable = OrderedDict(
                (moved.get(block_id, block_id), self.blocks[moved.get(block_id, block_id)])
                for block_id in self._evictable
            )
        for src_id, _ in moves:  # only now: a source must not be chosen as a destination
            self._push_free(src_id)
        return moves
