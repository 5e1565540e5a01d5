"""The memory tier: a byte-bounded LRU of immutable blocks.

Only the trio thread touches it, so it needs no lock. Blocks are bytes-like objects nobody
modifies (`bytes`, or the `bytearray` a store read filled), handed out as they are (readers slice
them with memoryview), so an evicted block stays valid for a reader holding it.
An evicted block is handed to `on_evict` (the block cache writes blocks not yet on the SSD then).
Bytes held outside the LRU can be charged to the tier (`charge`): blocks waiting for the SSD
count against the capacity, so that the LRU shrinks while they wait.

Recycling: `reserve` bytes of the capacity are kept free of blocks for the buffers waiting to be
reused (ufs/block_buffers.py; at most that many bytes of them), and an evicted block that
`on_evict` did not keep is offered to `recycle`, which reuses its buffer only if nothing else
refers to it (cache/blocks.py, "Concurrency rules"). So the blocks in the LRU and the free
buffers together stay within the capacity.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional, Union

log = logging.getLogger(__name__)

BlockId = tuple[str, str, int]      # (key, ETag, index of the block in the object)
Block = Union[bytes, bytearray, memoryview]    # a block's bytes, never modified once made


class MemoryTier:
    def __init__(self, capacity_bytes: int,
                 on_evict: Optional[Callable[[BlockId, Block], None]] = None,
                 recycle: Optional[Callable[[Block], bool]] = None, reserve: int = 0) -> None:
        self.capacity = capacity_bytes
        # may be set after construction, by whoever composes the tier with its SSD writes
        self.on_evict = on_evict
        self.recycle = recycle
        self.reserve = reserve      # bytes of the capacity left to the recycled buffers
        self.used = 0
        self.charged = 0            # bytes held outside the LRU but counted against the capacity
        self.evictions = 0
        self._blocks: OrderedDict[BlockId, Block] = OrderedDict()
        self._evicting = False

    def get(self, block_id: BlockId) -> Optional[Block]:
        data = self._blocks.get(block_id)
        if data is not None:
            self._blocks.move_to_end(block_id)
        return data

    def put(self, block_id: BlockId, data: Block) -> None:
        if len(data) > self.capacity:
            return
        old = self._blocks.pop(block_id, None)
        if old is not None:
            self.used -= len(old)
        self._blocks[block_id] = data
        self.used += len(data)
        self._evict()

    def charge(self, nbytes: int) -> None:
        """Count `nbytes` held elsewhere against the capacity (negative: give them back),
        evicting from the LRU to make room."""
        self.charged += nbytes
        if nbytes > 0:
            self._evict()

    def _evict(self) -> None:
        if self._evicting:      # on_evict charged bytes: the running loop makes room for them
            return
        self._evicting = True
        try:
            while self._blocks and \
                    self.used + self.charged + self.reserve > self.capacity:
                evicted_id, evicted = self._blocks.popitem(last=False)
                self.used -= len(evicted)
                self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(evicted_id, evicted)
                if self.recycle is not None:
                    # `evicted` is this loop's one reference; the SSD queue keeps its own
                    self.recycle(evicted)
        finally:
            self._evicting = False

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)
