"""The block cache's counters of hits, misses and prefetches (`cachefs stats`, the metrics).

Plain integers, changed on the trio thread only (the block cache's concurrency rules:
cachefs.cache.blocks). The SSD tier's own counters (writes, skipped writes, ...) are
cachefs.cache.disk.DiskCounters.
"""

import logging

log = logging.getLogger(__name__)


class CacheCounters:
    __slots__ = ('memory_hits', 'disk_hits', 'misses', 'shared_fetches', 'prefetches',
                 'prefetched_bytes', 'prefetch_dropped', 'disk_prefetches', 'memory_bytes_read',
                 'disk_bytes_read', 'store_bytes_read')

    memory_hits: int        # reads served from the memory tier, the prefetch buffer or the queue
    disk_hits: int          # reads served from the SSD tier (also those prefetched from it)
    misses: int             # blocks a reader fetched from the store
    shared_fetches: int     # reads that waited for a fetch another task had started
    prefetches: int         # blocks prefetched from the store ...
    prefetched_bytes: int   # ... and their bytes
    prefetch_dropped: int   # prefetches not made: no room in the prefetch budget
    disk_prefetches: int    # blocks prefetched from the SSD tier
    # Bytes answered to reads, by the tier they came from (BlockCache._block_range): memory
    # (the memory tier, blocks queued for the SSD), SSD (block files, blocks prefetched from
    # the SSD) and store (the reader's own fetches, fetches it shared, and blocks the prefetcher
    # read ahead from the store: those count as memory hits above, but their bytes came from
    # the store for this epoch). Their sum is what the daemon answered; reads served by the
    # kernel page cache never reach it.
    memory_bytes_read: int
    disk_bytes_read: int
    store_bytes_read: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
