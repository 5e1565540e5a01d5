"""Block-aligned reads of objects through the cache tiers, with single-flight fetches.

A block is identified by (key, etag, index): a changed object has a new ETag, so blocks of an
older version can never be served for it. An object is split into `block_size` blocks; the last
one is shorter. A FUSE read is served from the blocks it overlaps.

Concurrency rules (everything below runs on the one trio thread; only store calls leave it):
- A cache hit never yields to the event loop and takes no lock.
- A missing block is fetched once: the first reader registers a `_Fetch` in `_pending`, later
  readers of the same block wait on its event and share the result (or the error).
- A fetched block is checked for length before it is cached; a short or failed fetch caches
  nothing, so a later read tries again.
"""

import logging

import trio

from .memory import MemoryTier

log = logging.getLogger(__name__)


class _Fetch:
    __slots__ = ('done', 'data', 'error')

    def __init__(self):
        self.done = trio.Event()
        self.data = None
        self.error = None


class CacheCounters:
    __slots__ = ('hits', 'misses', 'shared_fetches')

    def __init__(self):
        self.hits = 0
        self.misses = 0
        self.shared_fetches = 0


class BlockCache:
    def __init__(self, store, block_size, memory_bytes):
        self.store = store
        self.block_size = block_size
        self.memory = MemoryTier(memory_bytes)
        self.counters = CacheCounters()
        self._pending = {}

    async def read(self, key, etag, file_size, offset, size):
        """Return up to `size` bytes of the object from `offset` (fewer only at end of file)."""
        end = min(offset + size, file_size)
        if offset >= end:
            return b''
        block_size = self.block_size
        first = offset // block_size
        last = (end - 1) // block_size
        if first == last:
            block = await self.block(key, etag, file_size, first)
            start = offset - first * block_size
            return memoryview(block)[start:start + end - offset]
        parts = []
        for index in range(first, last + 1):
            block = await self.block(key, etag, file_size, index)
            lo = max(offset - index * block_size, 0)
            hi = min(end - index * block_size, len(block))
            parts.append(memoryview(block)[lo:hi])
        return b''.join(parts)

    async def block(self, key, etag, file_size, index):
        block_id = (key, etag, index)
        while True:
            data = self.memory.get(block_id)
            if data is not None:
                self.counters.hits += 1
                return data
            fetch = self._pending.get(block_id)
            if fetch is None:
                break
            self.counters.shared_fetches += 1
            await fetch.done.wait()
            if fetch.data is not None:
                return fetch.data
            if isinstance(fetch.error, Exception):
                raise fetch.error
            # The fetching reader was cancelled: fetch it ourselves.
        self.counters.misses += 1
        fetch = self._pending[block_id] = _Fetch()
        try:
            offset = index * self.block_size
            length = min(self.block_size, file_size - offset)
            fetch.data = await self.store.read(key, etag, offset, length)
            self.memory.put(block_id, fetch.data)
            return fetch.data
        except BaseException as exc:
            fetch.error = exc
            raise
        finally:
            del self._pending[block_id]
            fetch.done.set()
