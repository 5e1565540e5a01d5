"""Block-aligned reads of objects through the memory and SSD tiers, with single-flight fetches
and sequential prefetch: the design of the block cache, and its concurrency rules, written once
for all the modules that make it up.

Layout (each module's docstring points here):

    blocks.py     BlockCache: composes the pieces below and serves read() (the hot path)
    fetches.py    single-flight fetches from the store, and the failures remembered a moment
    prefetch.py   sequential-stream detection, the prefetch window, buffer and budget
    writeback.py  the SSD write queue, its memory accounting, the writers, idle writes, flush
    disk_io.py    every SSD call: reads (inline or threaded), writes, unlinks, deadlines,
                  the tier going offline and the probe that brings it back
    counters.py   hit, miss and prefetch counters (`cachefs stats`)
    memory.py     the memory tier;  disk.py  the SSD tier's index and block file format

The pieces are wired once, in BlockCache.__init__; the memory-hit path stays in BlockCache.read
and _block_range, which read the pieces' dicts directly (no call through a layer per hit).

A block is identified by (key, etag, index): a changed object has a new ETag, so blocks of an
older version can never be served for it. An object is split into `block_size` blocks; the last
one is shorter. A FUSE read is served from the blocks it overlaps, tier by tier:

    memory tier (hot blocks) and prefetched blocks  ->  SSD tier (block files)  ->  store

A block a reader fetched from the store goes into the memory tier; a block the prefetcher
fetched waits in the prefetch buffer (bounded by --prefetch-memory, together with the prefetches
in flight) until it is read, and once read it moves to the memory tier when newer prefetches need
its room. A block read from the SSD is served from there and not copied into memory (no churn
between tiers, no passive second copy); the kernel page cache keeps what is hot.

SSD writes are deferred (write-back): a block fetched from the store goes to the SSD when it
leaves memory (evicted from the memory tier, or dropped from the prefetch buffer unused), when
nothing has been read for a moment, or at unmount. Why: during a cold epoch the SSD writes
compete with the fetches for CPU and disk (a cold epoch of the bench's shards ran at 234 MiB/s
without the SSD tier and 169 MiB/s with write-through; bench/RESULTS.md). Until written, the
block is served from memory. Blocks on their way to the SSD stay readable. The write queue holds
up to _MIN_QUEUED_BLOCKS (writeback.py) blocks of its own (as the writers' buffers would) and,
beyond those, up to half of --memory-cache-size, charged to the memory tier (its LRU shrinks
while they wait): the daemon's block memory stays within --memory-cache-size + --prefetch-memory
+ those few blocks. When the SSD is slower than the store and the queue is full, a block leaving
memory is dropped from the SSD path (counted as a skipped write) rather than make fetchers wait.
A kill -9 loses the blocks not yet written, which the next epoch fetches again: a cache, never
data.

A disk that stops answering: every SSD read, write, unlink and probe runs in a worker thread of
the SSD tier's own pool (_DISK_THREADS in disk_io.py, apart from trio's default pool and the
store's) under a deadline that includes the wait for a thread. A read that misses its deadline
is served from the store; any call that misses its deadline takes the SSD tier offline (one
warning): the calls under way are abandoned at once, nothing more is sent to the disk, the write
queue is dropped, reads go on from memory and the store, and the unmount writes nothing. A
thread stuck in the dead disk's syscall cannot be cancelled: it is abandoned, and keeps its slot
of the SSD pool until the disk answers, so at most _DISK_THREADS threads ever wait on a dead
disk (trio's default pool and the store's keep theirs), and the daemon still exits at unmount.
Every PROBE_INTERVAL seconds a probe (write, fsync, read back, remove a small file) tries the
disk; when it answers, the tier is back online, its index as it was (block files are verified on
every read anyway), or, when the tier went offline before the start-up scan ended, once that
scan ran.

Concurrency rules (S3QL style; written once, here):
- Everything in these modules runs on the one trio thread. Blocking work (store requests, SSD
  reads that would wait for the disk, SSD writes, unlinks, the start-up probe and scan) runs in
  worker threads through functions that touch no shared state; their results are applied on the
  trio thread. So the tiers, the pieces' dicts and the indexes need no lock (the pieces read and
  change each other's state directly, between two awaits), and a cache hit takes none. Every SSD
  call in a thread has a deadline (above); none is waited for once the tier is offline.
- A memory hit, and an SSD hit whose pages are in the kernel page cache (read with
  RWF_NOWAIT), never yield to the event loop.
- The one exception to "blocking work runs in threads": on a file system that takes RWF_NOWAIT
  (a local disk: ext4, xfs, btrfs; learnt by the start-up probe, in a thread), an SSD read of
  up to 256 KiB that is not in the page cache is made on the trio thread, while such reads stay
  fast (under 2 ms on average and 50 ms at most; here the median is 0.4 ms, the 99.9th
  percentile 6 ms). For small files the thread hand-off costs more CPU than the read: a warm
  epoch over 20,000 small files with the page cache dropped went from 1,099 to 1,478 files/s
  (bench/profile_epoch.py small-warm). Slow reads send them to worker threads for 5 s, so a
  sick disk holds the FUSE loop for at most one slow read every 5 s. Known limit: a local disk
  that stops answering in the middle of such a read (or of the open() of a block file whose
  folder entry is not cached) holds the loop until the kernel fails the I/O (NVMe: about 30 s);
  an inline read that took longer than the read deadline takes the tier offline. On FUSE,
  network file systems and tmpfs (no RWF_NOWAIT), where even an open() is a request to someone
  else, every SSD read runs in a thread.
- A missing block is fetched once: the first reader (or the prefetcher) registers a `Fetch`;
  later readers of that block wait on it and share its bytes or its error. If the fetching task
  is cancelled, a waiter fetches the block itself.
- A fetched block must have exactly the expected length before it is cached or served.
- Eviction only unlinks files; a reader that already opened one still reads whole, verified data.
  Readers never see a partially written block file: writes are renamed into place.
- Prefetch is bounded by one global budget (bytes in flight plus bytes fetched and kept),
  whatever the number of readers.
- Block buffers are recycled (ufs/block_buffers.py): a block's bytes are never modified while
  anyone can see them, so a buffer is reused for another block only once nothing refers to it.
  Two places offer buffers back, each holding the block in one local variable: the memory tier,
  for an evicted block the SSD queue did not take (memory.py), and an SSD writer, for a block
  it wrote that had left memory (writeback.py). The pool reuses a buffer only when its
  reference count is the caller's alone: a reader's memoryview, a FUSE reply under way
  (pyfuse3 holds a Py_buffer), the memory tier, the prefetch buffer, the SSD queue, a writer
  thread (also an abandoned one) and a fetch's waiters all hold references, so a buffer any of
  them may still read is never handed out. Whoever fills a reused buffer fills every byte of
  it before it is seen (a short store answer raises, and the buffer is dropped). The free
  buffers (at most _POOL_BLOCKS, fewer for a small memory tier) take their room from the memory
  tier's capacity (MemoryTier.reserve), so the memory formula is unchanged. Why: a cold epoch
  larger than the memory tier otherwise allocates a fresh buffer per block, and the kernel
  zeroes every new page (19-32% of the daemon's time in a cold epoch, bench/RESULTS.md and
  bench/profile_epoch.py cold --perf).
"""

from __future__ import annotations

import logging
import os
import time

from typing import Optional

import trio

from ..ufs import block_buffers
from .counters import CacheCounters
from .disk import PROBE_INTERVAL, DiskTier
from .disk_io import DiskIO
from .fetches import FAILURE_MEMORY_SECONDS, BlockStore, Fetches
from .memory import Block, MemoryTier
from .prefetch import PrefetchBuffer, Prefetcher
from .writeback import WriteBack

__all__ = ['BlockCache', 'CacheCounters', 'FAILURE_MEMORY_SECONDS']

log = logging.getLogger(__name__)

_IDLE = 1.0     # seconds without reads or fetches before unwritten blocks go to the SSD
# Free block buffers kept for reuse: enough for the evictions of a burst of landing fetches to
# feed the next fetches; at most 1/8 of the memory tier (their room comes from it).
_POOL_BLOCKS = 8


class BlockCache:
    """Reads of objects through the tiers (the module docstring), composed of: `memory` (the
    memory tier), the single-flight fetches, the prefetcher and its buffer, the write-back to
    the SSD, and the SSD tier's calls (`disk`, when there is an SSD tier)."""

    def __init__(self, store: BlockStore, block_size: int, memory_bytes: int,
                 disk: Optional[DiskTier] = None, prefetch_window: int = 0,
                 prefetch_memory: int = 0, idle_after: float = _IDLE,
                 probe_interval: float = PROBE_INTERVAL) -> None:
        self.store = store
        self.idle_after = idle_after
        self.block_size = block_size
        self.disk = disk
        self._probe_interval = probe_interval
        self.counters = CacheCounters()
        pool_blocks = min(_POOL_BLOCKS, memory_bytes // block_size // 8)
        self.buffers = block_buffers.configure(block_size, pool_blocks)
        self.memory = MemoryTier(memory_bytes, recycle=block_buffers.recycle,
                                 reserve=pool_blocks * block_size)
        self._prefetched = PrefetchBuffer()
        self._disk_io = DiskIO(disk, self.counters, probe_interval) if disk is not None else None
        self._writeback = WriteBack(block_size, self.memory, self._prefetched, self._disk_io)
        self.memory.on_evict = self._writeback.left_memory
        if self._disk_io is not None:
            self._disk_io.on_offline = self._writeback.drop_queue
        self._fetches = Fetches(store, block_size, self.counters, self.memory, self._prefetched,
                                self._writeback)
        self._prefetcher = Prefetcher(block_size, prefetch_window, prefetch_memory,
                                      self.counters, self.memory, self._prefetched,
                                      self._fetches, self._writeback, self._disk_io)
        self.max_window = self._prefetcher.max_window
        # The hot path (read, _block_range) reads these directly: no extra layer per read.
        self._prefetched_blocks = self._prefetched.blocks
        self._pending = self._fetches.pending
        self._fetch = self._fetches.fetch
        self._on_its_way_to_disk = self._writeback.on_its_way_to_disk
        self._prefetch_after = self._prefetcher.after

    @property
    def probe_interval(self) -> float:
        """Seconds between probes of an offline SSD tier (kept by the SSD calls' piece)."""
        return self._probe_interval

    @probe_interval.setter
    def probe_interval(self, seconds: float) -> None:
        self._probe_interval = seconds
        if self._disk_io is not None:
            self._disk_io.probe_interval = seconds

    # -- life cycle --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work: the start-up scan of the SSD tier, SSD writers, prefetch tasks."""
        async with trio.open_nursery() as nursery:
            self._prefetcher.nursery = nursery
            if self._disk_io is not None:
                self._disk_io.nursery = nursery
                for _ in range(2):
                    nursery.start_soon(self._writeback.writer)
                nursery.start_soon(self._writeback.write_when_idle, self.idle_after, self._idle)
                nursery.start_soon(self._disk_io.index)
            task_status.started()
            await trio.sleep_forever()

    def _idle(self) -> bool:
        """Nothing read or fetched for `idle_after` seconds, and no store fetch under way."""
        fetches = self._fetches
        return (time.monotonic() - fetches.last_activity >= self.idle_after
                and not fetches.from_store)

    async def flush(self) -> None:
        """Write every block not yet on the SSD (at unmount); nothing when the tier is offline."""
        await self._writeback.flush()

    # -- reads --

    async def read(self, key: str, etag: str, file_size: int, offset: int,
                   size: int) -> Block:
        """Return up to `size` bytes of the object from `offset` (fewer only at end of file)."""
        self._fetches.last_activity = time.monotonic()
        end = min(offset + size, file_size)
        if offset >= end:
            return b''
        block_size = self.block_size
        first = offset // block_size
        last = (end - 1) // block_size
        if self.max_window:
            self._prefetch_after(key, etag, file_size, offset, end)
        if first == last:
            start = offset - first * block_size
            return await self._block_range(key, etag, file_size, first, start, end - offset)
        parts = []
        for index in range(first, last + 1):
            lo = max(offset - index * block_size, 0)
            hi = min(end - index * block_size, block_size)
            parts.append(await self._block_range(key, etag, file_size, index, lo, hi - lo))
        return b''.join(parts)

    async def _block_range(self, key: str, etag: str, file_size: int, index: int, start: int,
                           length: int) -> Block:
        block_id = (key, etag, index)
        counters = self.counters
        data = self.memory.get(block_id)
        if data is not None:
            counters.memory_hits += 1
            counters.memory_bytes_read += length
            return memoryview(data)[start:start + length]
        prefetched = self._prefetched_blocks.get(block_id)
        if prefetched is not None:
            prefetched.read = True
            if prefetched.from_disk:
                counters.disk_hits += 1
                counters.disk_bytes_read += length
            else:
                counters.memory_hits += 1
                counters.store_bytes_read += length     # read ahead from the store
            return memoryview(prefetched.data)[start:start + length]
        data = self._on_its_way_to_disk(block_id)
        if data is not None:
            counters.memory_hits += 1
            counters.memory_bytes_read += length
            return memoryview(data)[start:start + length]
        pending = self._pending.get(block_id)
        if self._disk_io is not None and pending is None:
            data = await self._disk_io.read(block_id, start, length)
            if data is not None:
                counters.disk_bytes_read += length
                return data
        data = await self._fetch(block_id, file_size, prefetch=False)
        # A fetch already under way may be a prefetch from the SSD (a disk hit, fetches.py)
        if pending is not None and pending.from_disk:
            counters.disk_bytes_read += length
        else:
            counters.store_bytes_read += length
        return memoryview(data)[start:start + length]

    def cached_blocks(self, key: str, etag: str, file_size: int) -> tuple[int, int]:
        """(blocks of the object, blocks held in memory or on the SSD): for `warmup --check`."""
        blocks = (file_size + self.block_size - 1) // self.block_size
        held = 0
        disk = self.disk
        for index in range(blocks):
            block_id = (key, etag, index)
            if block_id in self.memory or block_id in self._prefetched_blocks or \
                    self._on_its_way_to_disk(block_id) is not None:
                held += 1
            elif disk is not None and not disk.offline:
                name = disk.name(block_id)
                if disk.holds(name) or (not disk.index_ready
                                        and os.path.exists(disk.path(name))):
                    held += 1
        return blocks, held

    # -- state, for stats and the daemon --

    @property
    def disk_writes_pending(self) -> int:
        """Blocks not on the SSD yet: held in memory, queued, or being written."""
        return self._writeback.pending

    @property
    def disk_queue_bytes(self) -> int:
        """Bytes of the blocks queued for the SSD or being written."""
        return self._writeback.queued_bytes

    @property
    def prefetch_memory_used(self) -> int:
        return self._prefetcher.memory_used

    @property
    def prefetch_in_flight(self) -> int:
        """Bytes of the prefetches under way (part of prefetch_memory_used)."""
        return self._prefetcher.in_flight
