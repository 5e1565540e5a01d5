"""The memory tier: a byte-bounded LRU of immutable blocks.

Only the trio thread touches it, so it needs no lock. Blocks are bytes-like objects nobody
modifies (`bytes`, or the `bytearray` a store read filled), handed out as they are (readers slice
them with memoryview), so an evicted block stays valid for a reader holding it.
An evicted block is handed to `on_evict` (the block cache writes blocks not yet on the SSD then).
Bytes held outside the LRU can be charged to the tier (`charge`): blocks waiting for the SSD
count against the capacity, so that the LRU shrinks while they wait.
"""

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)


class MemoryTier:
    def __init__(self, capacity_bytes, on_evict=None):
        self.capacity = capacity_bytes
        self._on_evict = on_evict
        self.used = 0
        self.charged = 0            # bytes held outside the LRU but counted against the capacity
        self.evictions = 0
        self._blocks = OrderedDict()
        self._evicting = False

    def get(self, block_id):
        data = self._blocks.get(block_id)
        if data is not None:
            self._blocks.move_to_end(block_id)
        return data

    def put(self, block_id, data):
        if len(data) > self.capacity:
            return
        old = self._blocks.pop(block_id, None)
        if old is not None:
            self.used -= len(old)
        self._blocks[block_id] = data
        self.used += len(data)
        self._evict()

    def charge(self, nbytes):
        """Count `nbytes` held elsewhere against the capacity (negative: give them back),
        evicting from the LRU to make room."""
        self.charged += nbytes
        if nbytes > 0:
            self._evict()

    def _evict(self):
        if self._evicting:      # on_evict charged bytes: the running loop makes room for them
            return
        self._evicting = True
        try:
            while self._blocks and self.used + self.charged > self.capacity:
                evicted_id, evicted = self._blocks.popitem(last=False)
                self.used -= len(evicted)
                self.evictions += 1
                if self._on_evict is not None:
                    self._on_evict(evicted_id, evicted)
        finally:
            self._evicting = False

    def __contains__(self, block_id):
        return block_id in self._blocks

    def __len__(self):
        return len(self._blocks)
