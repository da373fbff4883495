"""PyTorch's CUDA caching allocator, replayed on a dry run's allocations.

``torch.cuda.max_memory_allocated()`` does not count the bytes tensors ask for: it counts the allocator's
*blocks*. A request is rounded up to 512 bytes, served by the smallest cached free block that holds it,
and that block is split only when the remainder is worth keeping (at least 512 bytes in the small pool,
more than 1 MiB in the large one), so a block can carry up to 1 MiB beyond its tensor. Measured on an
H100 (64^3, 32 filters, bf16 + checkpointing): the requested bytes peaked at 610 MB, the blocks at 702 MB.
``max_memory_reserved()`` counts the segments taken from cudaMalloc: 2 MiB for small requests, 20 MiB
for 1-10 MiB ones (split among later requests), larger ones rounded up to 2 MiB.

:class:`CachingAllocatorModel` follows the rules of ``c10/cuda/CUDACachingAllocator.cpp`` with its
default settings (no ``PYTORCH_CUDA_ALLOC_CONF``), one stream and no memory pressure (cached blocks are
never released): ``round_size``, ``get_allocation_size``, best fit by (size, address), ``should_split``
and the merging of a freed block with its free neighbours in the same segment.
"""

from __future__ import annotations

from bisect import bisect_left, insort

MIN_BLOCK_BYTES = 512  # kMinBlockSize: every request is rounded up to a multiple of this
SMALL_SIZE = 2**20  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_BUFFER = 2 * 2**20  # kSmallBuffer: small pool segments
LARGE_BUFFER = 20 * 2**20  # kLargeBuffer: the segment for 1-10 MiB requests
MIN_LARGE_ALLOC = 10 * 2**20  # kMinLargeAlloc
ROUND_LARGE = 2 * 2**20  # kRoundLarge: larger requests get their own segment, rounded up to 2 MiB


def round_size(size: int) -> int:
    """The block size a request of `size` bytes needs (round_size)."""
    return max(MIN_BLOCK_BYTES, -(-size // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)


def segment_size(size: int) -> int:
    """The cudaMalloc size for a rounded request that no cached block holds (get_allocation_size)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocatorModel:
    """Blocks and segments of the caching allocator; `allocated` and `reserved` as its statistics count them."""

    def __init__(self) -> None:
        self.free_blocks: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small pool? -> [(size, addr)]
        self.size_of: dict[int, int] = {}  # block address -> size (every block, free or not)
        self.start_at_end: dict[int, int] = {}  # block end address -> block address, to find a left neighbour
        self.small_pool: dict[int, bool] = {}  # block address -> in the small pool
        self.in_use: set[int] = set()
        self.next_address = 0
        self.allocated = 0
        self.reserved = 0

    def _add_block(self, address: int, size: int, small: bool) -> None:
        self.size_of[address] = size
        self.start_at_end[address + size] = address
        self.small_pool[address] = small

    def _drop_block(self, address: int) -> None:
        size = self.size_of.pop(address)
        del self.start_at_end[address + size]
        del self.small_pool[address]

    def _unlist_free(self, address: int) -> None:
        pool = self.free_blocks[self.small_pool[address]]
        del pool[bisect_left(pool, (self.size_of[address], address))]

    def malloc(self, nbytes: int) -> tuple[int | None, int]:
        """Allocate `nbytes`: (block address, block size); (None, 0) for an empty request."""
        if nbytes <= 0:
            return None, 0
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self.free_blocks[small]
        index = bisect_left(pool, (size, -1))
        if index < len(pool):
            block_size, address = pool.pop(index)
        else:  # a new segment; a gap after it keeps blocks of different segments from ever merging
            block_size, address = segment_size(size), self.next_address
            self.next_address += block_size + MIN_BLOCK_BYTES
            self.reserved += block_size
            self._add_block(address, block_size, small)
        remaining = block_size - size
        if remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_SIZE:  # should_split
            self._drop_block(address)
            self._add_block(address, size, small)
            self._add_block(address + size, remaining, small)
            insort(pool, (remaining, address + size))
            block_size = size
        self.in_use.add(address)
        self.allocated += block_size
        return address, block_size

    def free(self, address: int) -> None:
        """Return a block to its pool, merged with free neighbours of its segment."""
        self.in_use.remove(address)
        size, small = self.size_of[address], self.small_pool[address]
        self.allocated -= size
        following = address + size
        if following in self.size_of and following not in self.in_use:
            self._unlist_free(following)
            size += self.size_of[following]
            self._drop_block(following)
        preceding = self.start_at_end.get(address)
        if preceding is not None and preceding not in self.in_use:
            self._unlist_free(preceding)
            size += self.size_of[preceding]
            self._drop_block(preceding)
            self._drop_block(address)
            address = preceding
        else:
            self._drop_block(address)
        self._add_block(address, size, small)
        insort(self.free_blocks[small], (size, address))
