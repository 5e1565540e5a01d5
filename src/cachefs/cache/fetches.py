"""Single-flight fetches of blocks from the store: a block missing from every tier is fetched
once, whoever asks (readers, the prefetcher); the others wait for that fetch and share its bytes
or its error. A block whose fetch just failed fails again at once for a moment.

The rules (who may touch a block, when; what a waiter does when the fetching task is
cancelled; a fetched block's length) are written once, in cachefs.cache.blocks's module
docstring ("Concurrency rules").
"""

from __future__ import annotations

import logging
import time

from typing import TYPE_CHECKING, Optional, Protocol

import cachetools
import trio

from .memory import Block, BlockId, MemoryTier

if TYPE_CHECKING:
    from .counters import CacheCounters
    from .prefetch import PrefetchBuffer
    from .writeback import WriteBack

log = logging.getLogger(__name__)

FAILURE_MEMORY_SECONDS = 0.5  # how long a failed block keeps failing without a new fetch


class BlockStore(Protocol):
    """What the block cache asks of the store (ufs.async_store.AsyncStore)."""

    async def read(self, key: str, etag: str, offset: int, length: int) -> Block:
        """Exactly `length` bytes of version `etag` of `key` from `offset`."""
        ...


class Fetch:
    """A fetch under way: its waiters wait for `done`, then share `data` or `error`."""
    __slots__ = ('done', 'data', 'error', 'from_disk')

    def __init__(self, from_disk: bool = False) -> None:
        self.done = trio.Event()
        self.data: Optional[Block] = None
        self.error: Optional[BaseException] = None
        self.from_disk = from_disk      # a prefetch of the block from the SSD tier


class Fetches:
    """The fetches under way (`pending`, block id -> Fetch) and those just failed. A fetched
    block goes where it belongs (the prefetch buffer or the memory tier, and the SSD's queue
    later) before its waiters wake."""

    def __init__(self, store: BlockStore, block_size: int, counters: CacheCounters,
                 memory: MemoryTier, prefetched: PrefetchBuffer, writeback: WriteBack) -> None:
        self.store = store
        self.block_size = block_size
        self.counters = counters
        self.memory = memory
        self.prefetched = prefetched
        self.writeback = writeback
        self.pending: dict[BlockId, Fetch] = {}
        # A block whose fetch just failed fails again at once for a moment: the kernel asks
        # again for the pages of a failed readahead, and should not wait out the retries twice.
        self._recent_failures: cachetools.TTLCache[BlockId, Exception] = \
            cachetools.TTLCache(maxsize=1024, ttl=FAILURE_MEMORY_SECONDS)
        self.from_store = 0             # fetches from the store under way
        self.last_activity = 0.0        # the last read or store fetch, time.monotonic()

    def start(self, block_id: BlockId, from_disk: bool = False) -> Fetch:
        """Register a fetch of `block_id` (not under way yet); end it with finish()."""
        fetch = self.pending[block_id] = Fetch(from_disk)
        return fetch

    def finish(self, block_id: BlockId, fetch: Fetch) -> None:
        del self.pending[block_id]
        fetch.done.set()

    async def fetch(self, block_id: BlockId, file_size: int, prefetch: bool) -> Block:
        """The block's bytes, from the fetch under way or from a new fetch from the store;
        `prefetch`: for the prefetch buffer (not a miss)."""
        while True:
            fetch = self.pending.get(block_id)
            if fetch is None:
                break
            await fetch.done.wait()
            if fetch.data is not None:
                prefetched = self.prefetched.blocks.get(block_id)
                if prefetched is not None:
                    prefetched.read = True    # else it would hold the prefetch budget for 30 s
                if fetch.from_disk:
                    self.counters.disk_hits += 1
                else:
                    self.counters.shared_fetches += 1
                return fetch.data
            if isinstance(fetch.error, Exception):
                raise fetch.error
            data = self.memory.get(block_id)   # the fetcher was cancelled: try again ourselves
            if data is not None:
                return data
        failure = self._recent_failures.get(block_id)
        if failure is not None:
            raise failure
        if not prefetch:
            self.counters.misses += 1
        fetch = self.start(block_id)
        self.from_store += 1
        try:
            key, etag, index = block_id
            offset = index * self.block_size
            length = min(self.block_size, file_size - offset)
            data = await self.store.read(key, etag, offset, length)
        except BaseException as exc:
            fetch.error = exc
            if isinstance(exc, Exception):
                self._recent_failures[block_id] = exc
            raise
        else:
            fetch.data = data
            self.writeback.fetched(block_id)
            if prefetch:
                self.prefetched.keep(block_id, data)
            else:
                self.writeback.put_in_memory(block_id, data)
        finally:
            self.from_store -= 1
            self.last_activity = time.monotonic()
            self.finish(block_id, fetch)
        return data
