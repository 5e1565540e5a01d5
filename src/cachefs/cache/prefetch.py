"""Sequential prefetch: which reads are sequential (per object), how far ahead to fetch (a window
that doubles up to --prefetch-window), and the prefetch buffer where fetched-ahead blocks wait to
be read, all within one memory budget (--prefetch-memory: bytes in flight plus bytes kept).

The rules (the global budget, where a prefetched block goes once read or dropped) are written
once, in cachefs.cache.blocks's module docstring.
"""

from __future__ import annotations

import logging
import time

from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import cachetools
import trio

from .memory import Block, BlockId, MemoryTier

if TYPE_CHECKING:
    from .counters import CacheCounters
    from .disk_io import DiskIO
    from .fetches import Fetches
    from .writeback import WriteBack

log = logging.getLogger(__name__)

_SEQUENTIAL_SLACK = 8 << 20  # the kernel's parallel readahead arrives slightly out of order
_UNREAD_PREFETCH_TTL = 30.0  # an unread prefetched block older than this was abandoned


class Prefetched:
    """A prefetched block waiting in the prefetch buffer."""
    __slots__ = ('data', 'from_disk', 'read', 'since')

    def __init__(self, data: Block, from_disk: bool) -> None:
        self.data = data
        self.from_disk = from_disk
        self.read = False           # a reader used it: it may make room for newer prefetches
        self.since = time.monotonic()


class PrefetchBuffer:
    """The prefetched blocks (`blocks`: block id -> Prefetched, oldest first; the block cache
    reads this very dict on its hot path) and their bytes."""
    __slots__ = ('blocks', 'bytes')

    def __init__(self) -> None:
        self.blocks: OrderedDict[BlockId, Prefetched] = OrderedDict()
        self.bytes = 0

    def keep(self, block_id: BlockId, data: Block, from_disk: bool = False) -> None:
        self.blocks[block_id] = Prefetched(data, from_disk)
        self.bytes += len(data)

    def held(self, block_id: BlockId) -> Optional[Block]:
        entry = self.blocks.get(block_id)
        return entry.data if entry is not None else None


class _Stream:
    """Sequential-read state of one object."""
    __slots__ = ('next_offset', 'window')

    def __init__(self) -> None:
        self.next_offset = 0
        self.window = 0


class Prefetcher:
    """Starts prefetches after each read (after()) in `nursery`, set by the block cache's run().
    `in_flight`: bytes of the prefetches under way."""

    def __init__(self, block_size: int, prefetch_window: int, prefetch_memory: int,
                 counters: CacheCounters, memory: MemoryTier, buffer: PrefetchBuffer,
                 fetches: Fetches, writeback: WriteBack, disk_io: Optional[DiskIO]) -> None:
        self.block_size = block_size
        self.max_window = prefetch_window // block_size
        self.budget = prefetch_memory
        self.in_flight = 0
        self.counters = counters
        self.memory = memory
        self.buffer = buffer
        self.fetches = fetches
        self.writeback = writeback
        self.disk_io = disk_io
        self.nursery: trio.Nursery
        self._streams: cachetools.LRUCache[str, _Stream] = \
            cachetools.LRUCache(maxsize=4096)   # key -> _Stream

    @property
    def memory_used(self) -> int:
        return self.in_flight + self.buffer.bytes

    def after(self, key: str, etag: str, file_size: int, offset: int, end: int) -> None:
        """A read of [offset, end) of the object: prefetch the blocks after it if the object is
        read sequentially."""
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream()
        if abs(offset - stream.next_offset) <= _SEQUENTIAL_SLACK:
            stream.window = min(max(stream.window * 2, 1), self.max_window)
            stream.next_offset = max(stream.next_offset, end)
        else:
            stream.window = 0               # random access: stop prefetching this object
            stream.next_offset = end
            return
        block_size = self.block_size
        last_block = (file_size - 1) // block_size
        first = (end - 1) // block_size + 1
        pending = self.fetches.pending
        prefetched = self.buffer.blocks
        disk_io = self.disk_io
        on_its_way_to_disk = self.writeback.on_its_way_to_disk
        for index in range(first, min(first + stream.window, last_block + 1)):
            block_id = (key, etag, index)
            if block_id in pending or block_id in self.memory or \
                    block_id in prefetched or \
                    on_its_way_to_disk(block_id) is not None:
                continue
            length = min(block_size, file_size - index * block_size)
            if not self._room_for(length):
                self.counters.prefetch_dropped += 1
                return
            self.in_flight += length
            # A block on the SSD is prefetched from there: whole 4 MiB reads in a worker thread
            # instead of four 1 MiB reads, each paying a thread hop and a cold-disk wait.
            on_disk = disk_io is not None and disk_io.disk.holds(disk_io.disk.name(block_id))
            self.nursery.start_soon(self._prefetch, block_id, file_size, length, on_disk)

    def _room_for(self, length: int) -> bool:
        """Make room in the prefetch budget (in flight + fetched) by dropping prefetched blocks
        that were read already, or that nobody read for a long time; never one still awaited,
        which a reader would then fetch a second time. False when there is no room."""
        buffer = self.buffer
        needed = self.in_flight + buffer.bytes + length - self.budget
        if needed <= 0:
            return True
        abandoned = time.monotonic() - _UNREAD_PREFETCH_TTL
        victims = []
        for block_id, entry in buffer.blocks.items():
            if entry.read or entry.since < abandoned:
                victims.append(block_id)
                needed -= len(entry.data)
                if needed <= 0:
                    break
        if needed > 0:
            return False
        for block_id in victims:
            entry = buffer.blocks.pop(block_id)
            buffer.bytes -= len(entry.data)
            if entry.read and not entry.from_disk:
                # Read from the store and used, like a block a reader fetched itself: it joins
                # the memory tier rather than vanish, so that the memory tier holds the latest
                # blocks read whether they came by prefetch or not. (A block from the SSD stays
                # out of the memory tier: no churn between tiers.)
                self.writeback.put_in_memory(block_id, entry.data)
            else:
                self.writeback.left_memory(block_id, entry.data)
        return True

    async def _prefetch(self, block_id: BlockId, file_size: int, length: int,
                        on_disk: bool) -> None:
        try:
            if on_disk and await self._from_disk(block_id, length):
                return
            await self.fetches.fetch(block_id, file_size, prefetch=True)
            self.counters.prefetches += 1
            self.counters.prefetched_bytes += length
        except Exception as exc:
            # The reader that needs this block will fetch it and see the error itself.
            log.debug('prefetch of %s failed: %s', block_id, exc)
        finally:
            self.in_flight -= length

    async def _from_disk(self, block_id: BlockId, length: int) -> bool:
        """Read a whole block from the SSD into the prefetch buffer; False if it is not there
        (evicted, corrupt), so that the caller fetches it from the store instead."""
        fetches = self.fetches
        if block_id in fetches.pending:
            return True
        assert self.disk_io is not None     # on_disk: there is an SSD tier
        fetch = fetches.start(block_id, from_disk=True)
        try:
            fetch.data = await self.disk_io.read(block_id, 0, length, in_thread=True)
        finally:
            fetches.finish(block_id, fetch)
        if fetch.data is None:
            return False
        self.buffer.keep(block_id, fetch.data, from_disk=True)
        self.counters.disk_prefetches += 1
        return True
