"""The KV cache tensors: per layer, K and V as [max_num_blocks, block_size, num_kv_heads, D].

The pool is elastic (core/block_pool.py): block ids are cut into segments that are allocated
or released. Each layer's K and V stay one tensor over the pool's maximum, so attention
indexes blocks by id with no per-segment bookkeeping, but only allocated segments hold
memory. On CPU the tensors are reserved with torch.empty, which for large sizes maps
address space without touching pages; a segment's pages are committed when the segment is
allocated (zero-filled, so its memory is counted at once and reads are never garbage) and
handed back to the kernel with madvise(MADV_DONTNEED) when it is released: the process's
anonymous memory drops by the segment's size. On other devices the tensors are allocated in
full and a release only zeroes the segment.
"""

import ctypes
import functools
import mmap

import torch

PAGE_SIZE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise() -> "ctypes._NamedFuncPointer | None":
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_num_blocks: int,
        segment_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_num_blocks, block_size, num_kv_heads, head_dim)
        self.on_cpu = device.type == "cpu"
        make = torch.empty if self.on_cpu else torch.zeros
        self.layers = [
            (make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.max_num_blocks = max_num_blocks
        self.segment_blocks = segment_blocks
        self.block_size = block_size
        if self.on_cpu:
            # torch.empty may reuse pages another tensor dirtied: start from a clean slate.
            for segment in range(-(-max_num_blocks // segment_blocks)):
                self.release_segment(segment)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size

    @property
    def block_bytes(self) -> int:
        k, _ = self.layers[0]
        return 2 * len(self.layers) * k[0].nbytes

    @property
    def host_reserved_bytes(self) -> int:
        """Bytes of host memory reserved for the pool at its maximum (0 off CPU): malloc counts
        all of it as allocated, committed or not."""
        return self.max_num_blocks * self.block_bytes if self.on_cpu else 0

    @property
    def bytes_per_segment(self) -> int:
        return self.segment_blocks * self.block_bytes

    def _segment_views(self, segment: int) -> list[torch.Tensor]:
        start = segment * self.segment_blocks
        stop = min(start + self.segment_blocks, self.max_num_blocks)
        return [tensor[start:stop] for kv in self.layers for tensor in kv]

    def commit_segment(self, segment: int) -> None:
        """Touch a newly allocated segment's memory (zeros), so it is resident from now on."""
        for view in self._segment_views(segment):
            view.zero_()

    def release_segment(self, segment: int) -> None:
        """Give a released segment's memory back; its blocks read as zeros afterwards."""
        madvise = _madvise() if self.on_cpu else None
        for view in self._segment_views(segment):
            start, end = view.data_ptr(), view.data_ptr() + view.nbytes
            first_page = -(-start // PAGE_SIZE) * PAGE_SIZE
            last_page = end // PAGE_SIZE * PAGE_SIZE
            if madvise is None or last_page <= first_page:
                view.zero_()
                continue
            if madvise(first_page, last_page - first_page, MADV_DONTNEED) != 0:
                view.zero_()  # not returned, but correct
                continue
            # Partial pages at the edges are shared with neighbours: zero just our bytes.
            flat = view.view(-1).view(torch.uint8)
            flat[: first_page - start].zero_()
            flat[last_page - start :].zero_()

    def copy_blocks(self, moves: list[tuple[int, int]]) -> None:
        """Copy each (src, dst) block's K and V in every layer: compaction's data move."""
        if not moves:
            return
        device = self.layers[0][0].device
        src = torch.tensor([s for s, _ in moves], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in moves], dtype=torch.long, device=device)
        for k, v in self.layers:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
