"""Block-aligned reads of objects through the memory and SSD tiers, with single-flight fetches
and sequential prefetch.

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
block is served from memory. Blocks on their way to the SSD stay readable. The write queue
holds up to _MIN_QUEUED_BLOCKS blocks of its own (as the writers' buffers would) and, beyond
those, up to half of --memory-cache-size, charged to the memory tier (its LRU shrinks while they
wait): the daemon's block memory stays within --memory-cache-size + --prefetch-memory + those few
blocks. When the SSD is slower than the store and the queue is full, a block leaving memory is
dropped from the SSD path (counted as a skipped write) rather than make fetchers wait. A kill -9
loses the blocks not yet written, which the next epoch fetches again: a cache, never data.

A disk that stops answering: every SSD read, write, unlink and probe runs in a worker thread of
the SSD tier's own pool (_DISK_THREADS, apart from trio's default pool and the store's) under a
deadline that includes the wait for a thread. A read that misses its deadline is served from the
store; any call that misses its deadline takes the SSD tier offline (one warning): the calls
under way are abandoned at once, nothing more is sent to the disk, the write queue is dropped,
reads go on from memory and the store, and the unmount writes nothing. A thread stuck in the
dead disk's syscall cannot be cancelled: it is abandoned, and keeps its slot of the SSD pool
until the disk answers, so at most _DISK_THREADS threads ever wait on a dead disk (trio's
default pool and the store's keep theirs), and the daemon still exits at unmount. Every
PROBE_INTERVAL seconds a probe (write, fsync, read back, remove a small file) tries the disk;
when it answers, the tier is back online, its index as it was (block files are verified on every
read anyway), or, when the tier went offline before the start-up scan ended, once that scan ran.

Concurrency rules (S3QL style; written once, here):
- Everything in this module runs on the one trio thread. Blocking work (store requests, SSD reads
  that would wait for the disk, SSD writes, unlinks, the start-up probe and scan) runs in worker
  threads through functions that touch no shared state; their results are applied on the trio
  thread. So the tiers and their indexes need no lock, and a cache hit takes none. Every SSD
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
- A missing block is fetched once: the first reader (or the prefetcher) registers a `_Fetch`;
  later readers of that block wait on it and share its bytes or its error. If the fetching task
  is cancelled, a waiter fetches the block itself.
- A fetched block must have exactly the expected length before it is cached or served.
- Eviction only unlinks files; a reader that already opened one still reads whole, verified data.
  Readers never see a partially written block file: writes are renamed into place.
- Prefetch is bounded by one global budget (bytes in flight plus bytes fetched and kept),
  whatever the number of readers.
"""

import errno
import logging
import os
import time

from collections import OrderedDict

import cachetools
import trio

from .disk import (PROBE_INTERVAL, CorruptBlock, disk_free, probe, read_block_file, scan,
                   unlink_quietly, write_block_file)
from .memory import MemoryTier

log = logging.getLogger(__name__)

_MIN_QUEUED_BLOCKS = 8       # blocks that may wait for the SSD outside the memory tier's budget
_DISK_THREADS = 16           # worker threads for SSD I/O (their own pool: see "A disk that ...")
_DISK_READ_DEADLINE = 5.0    # an SSD read that takes longer is served from the store ...
_DISK_DEADLINE = 15.0        # ... and any SSD call that takes longer takes the tier offline
_INLINE_READ_MAX = 262144    # SSD reads up to this size may run on the trio thread ...
_SLOW_INLINE_READ = 0.002    # ... while they take less than this on average ...
_STALLED_INLINE_READ = 0.05  # ... and none takes longer than this ...
_INLINE_PAUSE = 5.0          # ... else they go to worker threads for this long
_IDLE = 1.0                  # seconds without reads or fetches before unwritten blocks go to the SSD
_SEQUENTIAL_SLACK = 8 << 20  # the kernel's parallel readahead arrives slightly out of order
_UNREAD_PREFETCH_TTL = 30.0  # an unread prefetched block older than this was abandoned
_HEADER_ALLOWANCE = 8192     # a block file's header and alignment, reserved before writing
FAILURE_MEMORY_SECONDS = 0.5  # how long a failed block keeps failing without a new fetch


class _DiskOffline(Exception):
    """The SSD tier is offline, or a call to it just missed its deadline."""


class _Fetch:
    __slots__ = ('done', 'data', 'error', 'from_disk')

    def __init__(self, from_disk=False):
        self.done = trio.Event()
        self.data = None
        self.error = None
        self.from_disk = from_disk


class _Stream:
    """Sequential-read state of one object."""
    __slots__ = ('next_offset', 'window')

    def __init__(self):
        self.next_offset = 0
        self.window = 0


class _Prefetched:
    """A prefetched block waiting in the prefetch buffer."""
    __slots__ = ('data', 'from_disk', 'read', 'since')

    def __init__(self, data, from_disk):
        self.data = data
        self.from_disk = from_disk
        self.read = False           # a reader used it: it may make room for newer prefetches
        self.since = time.monotonic()


class CacheCounters:
    __slots__ = ('memory_hits', 'disk_hits', 'misses', 'shared_fetches', 'prefetches',
                 'prefetched_bytes', 'prefetch_dropped', 'disk_prefetches')

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


class BlockCache:
    def __init__(self, store, block_size, memory_bytes, disk=None, prefetch_window=0,
                 prefetch_memory=0, idle_after=_IDLE, probe_interval=PROBE_INTERVAL):
        self.store = store
        self.idle_after = idle_after
        self.block_size = block_size
        self.memory = MemoryTier(memory_bytes, on_evict=self._left_memory)
        self.disk = disk
        self.counters = CacheCounters()
        self.max_window = prefetch_window // block_size
        self.prefetch_budget = prefetch_memory
        self.prefetch_in_flight = 0
        # block_id -> _Prefetched, oldest first, within the prefetch budget
        self._prefetched = OrderedDict()
        self._prefetched_bytes = 0
        self._pending = {}
        self._nowait_works = False      # until the start-up probe says the disk takes RWF_NOWAIT
        self._inline_reads_after = 0.0  # time.monotonic() from which small SSD reads run inline
        self._inline_read_time = 0.0    # their moving average, seconds
        # A block whose fetch just failed fails again at once for a moment: the kernel asks
        # again for the pages of a failed readahead, and should not wait out the retries twice.
        self._recent_failures = cachetools.TTLCache(maxsize=1024, ttl=FAILURE_MEMORY_SECONDS)
        self._headers = cachetools.LRUCache(maxsize=65536)   # block file name -> Header
        self._streams = cachetools.LRUCache(maxsize=4096)    # key -> _Stream
        self._nursery = None
        # SSD writes: block ids held in memory (tier or prefetch buffer) and not yet written, in
        # fetch order; then the blocks queued for the writers, readable until written.
        self._unwritten = {}
        self._write_queue = OrderedDict()       # block_id -> data
        self._writing = {}                      # block_id -> data, in a writer's hands
        self._queued_bytes = 0                  # in both
        # Their room: a few blocks of their own (as the writers' buffers), and beyond those up
        # to half the memory tier, charged to it (its LRU shrinks while they wait). The queued
        # blocks still held in memory too (queued while idle, or at unmount) are not charged.
        self._queue_allowance = _MIN_QUEUED_BLOCKS * block_size
        self._queue_limit = self._queue_allowance + memory_bytes // 2
        self._not_charged = set()
        self._left_memory_bytes = 0     # queued bytes no longer held in memory
        self._writers = trio.lowlevel.ParkingLot()    # writers waiting for work
        self._queue_room = trio.lowlevel.ParkingLot()  # woken when a write ends, or at offline
        self._disk_limiter = trio.CapacityLimiter(_DISK_THREADS)
        self._disk_calls = set()        # cancel scopes of the disk calls under way
        self.probe_interval = probe_interval
        self._store_fetches = 0
        self._last_activity = 0.0       # the last read or store fetch, time.monotonic()

    # -- life cycle --

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Background work: the start-up scan of the SSD tier, SSD writers, prefetch tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.disk is not None:
                for _ in range(2):
                    nursery.start_soon(self._disk_writer)
                nursery.start_soon(self._write_when_idle)
                nursery.start_soon(self._index_disk)
            task_status.started()
            await trio.sleep_forever()

    async def _index_disk(self):
        try:
            self._nowait_works = await self._disk_call(_DISK_DEADLINE, probe, self.disk.folder)
            # No deadline for the scan of a big cache; reads do not wait for it.
            found = await self._disk_call(None, scan, self.disk.folder)
        except _DiskOffline:
            return
        except OSError as exc:
            self._disk_stuck(f'the start-up probe failed ({exc.strerror})')
            return
        self.disk.merge_scan(found)
        self._enforce_disk_limits(self.disk.admission(0))

    def _enforce_disk_limits(self, victims):
        if victims:
            self._nursery.start_soon(self._unlink_quietly, victims)

    async def _unlink(self, names):
        for name in names:
            self._headers.pop(name, None)
        await self._disk_call(_DISK_DEADLINE, unlink_quietly, [self.disk.path(n) for n in names])

    async def _unlink_quietly(self, names):
        try:
            await self._unlink(names)
        except _DiskOffline:
            pass

    # -- a disk that stops answering --

    async def _disk_call(self, deadline, fn, *args, probing=False):
        """fn(*args) in a thread of the SSD tier's pool, within `deadline` seconds (None: no
        limit) counted from now, waiting for a thread included. Raises _DiskOffline when the
        tier is offline, or when the call misses its deadline, which takes the tier offline."""
        if self.disk.offline and not probing:
            raise _DiskOffline
        with trio.move_on_after(float('inf') if deadline is None else deadline) as scope:
            self._disk_calls.add(scope)
            try:
                # abandon_on_cancel: a thread stuck in the disk's syscall cannot be interrupted;
                # it keeps its slot in _disk_limiter (not trio's default pool) until it returns.
                return await trio.to_thread.run_sync(fn, *args, limiter=self._disk_limiter,
                                                     abandon_on_cancel=True)
            finally:
                self._disk_calls.discard(scope)
        # Cancelled: by its deadline, or by _disk_stuck (another call missed its own; a call
        # without a deadline, such as the start-up scan, ends only that way).
        if not probing and not self.disk.offline:
            self._disk_stuck(f'{fn.__name__} took more than {deadline:g} s')
        raise _DiskOffline

    def _disk_stuck(self, reason):
        """Stop using the disk: drop the write queue (a cache, never data), forget what was to
        be written, wake whoever waits for the queue, and probe the disk until it answers."""
        if self.disk.offline:
            return
        self.disk.go_offline(reason)
        for scope in self._disk_calls:     # nobody waits for the other calls under way
            scope.cancel()
        self._unwritten.clear()
        while self._write_queue:
            block_id, data = self._write_queue.popitem(last=False)
            self._unqueue(block_id, data)
            self.disk.counters.skipped_writes += 1
        self._queue_room.unpark_all()
        self._nursery.start_soon(self._probe_until_back)

    async def _probe_until_back(self):
        while True:
            await trio.sleep(self.probe_interval)
            try:
                await self._disk_call(_DISK_DEADLINE, probe, self.disk.folder, probing=True)
            except (_DiskOffline, OSError) as exc:
                log.debug('the SSD tier still does not answer: %r', exc)
                continue
            self.disk.back_online()
            if not self.disk.index_ready:   # the start-up scan was cut short: run it now
                self._nursery.start_soon(self._index_disk)
            return

    # -- reads --

    async def read(self, key, etag, file_size, offset, size):
        """Return up to `size` bytes of the object from `offset` (fewer only at end of file)."""
        self._last_activity = time.monotonic()
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

    async def _block_range(self, key, etag, file_size, index, start, length):
        block_id = (key, etag, index)
        data = self.memory.get(block_id)
        if data is not None:
            self.counters.memory_hits += 1
            return memoryview(data)[start:start + length]
        prefetched = self._prefetched.get(block_id)
        if prefetched is not None:
            prefetched.read = True
            if prefetched.from_disk:
                self.counters.disk_hits += 1
            else:
                self.counters.memory_hits += 1
            return memoryview(prefetched.data)[start:start + length]
        data = self._on_its_way_to_disk(block_id)
        if data is not None:
            self.counters.memory_hits += 1
            return memoryview(data)[start:start + length]
        if self.disk is not None and block_id not in self._pending:
            data = await self._read_disk(block_id, start, length)
            if data is not None:
                return data
        data = await self._fetch(block_id, file_size, prefetch=False)
        return memoryview(data)[start:start + length]

    async def _read_disk(self, block_id, start, length, in_thread=False):
        disk = self.disk
        name = disk.name(block_id)
        if disk.offline or not disk.may_hold(name):
            return None
        path = disk.path(name)
        header = self._headers.get(name)
        try:
            try:
                if in_thread or not self._nowait_works:
                    raise BlockingIOError
                header, data = read_block_file(path, block_id, start, length, header,
                                               os.RWF_NOWAIT)
            except BlockingIOError:
                if not in_thread and self._nowait_works and length <= _INLINE_READ_MAX and \
                        time.monotonic() >= self._inline_reads_after:
                    header, data = self._read_inline(path, block_id, start, length, header)
                else:
                    header, data = await self._disk_call(
                        _DISK_READ_DEADLINE, read_block_file, path, block_id, start, length,
                        header)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # overlayfs on older kernels refuses RWF_NOWAIT on some files: read in threads.
                log.info('the cache file system does not support RWF_NOWAIT; SSD reads go '
                         'through worker threads')
                self._nowait_works = False
                header, data = await self._disk_call(
                    _DISK_READ_DEADLINE, read_block_file, path, block_id, start, length, header)
        except _DiskOffline:
            return None         # the tier is offline now: the caller reads from the store
        except FileNotFoundError:
            self._headers.pop(name, None)
            disk.forget(name)
            return None
        except CorruptBlock as exc:
            log.debug('%s: %s', path, exc)
            disk.corrupt(name)
            self._enforce_disk_limits([name])
            return None
        except OSError as exc:
            log.warning('cache block %s unreadable (%s); reading from the store', path,
                        exc.strerror)
            return None
        self._headers[name] = header
        disk.touch(name)
        if not in_thread:       # a prefetch counts as a hit when it is read
            self.counters.disk_hits += 1
        return data

    def _read_inline(self, path, block_id, start, length, header):
        """A small SSD read on the trio thread; when these are slow (on average, or one very
        slow), the next ones go to worker threads for a while."""
        started = time.monotonic()
        result = read_block_file(path, block_id, start, length, header)
        elapsed = time.monotonic() - started
        if elapsed > _DISK_READ_DEADLINE:
            self._disk_stuck(f'an SSD read on the event loop took {elapsed:.0f} s')
        self._inline_read_time += (elapsed - self._inline_read_time) / 16    # moving average
        if self._inline_read_time > _SLOW_INLINE_READ or elapsed > _STALLED_INLINE_READ:
            log.info('small SSD reads take %.1f ms (average; the last %.1f ms): they go through '
                     'worker threads for %.0f s', self._inline_read_time * 1e3, elapsed * 1e3,
                     _INLINE_PAUSE)
            self._inline_reads_after = time.monotonic() + _INLINE_PAUSE
            self._inline_read_time = 0.0
        return result

    async def _fetch(self, block_id, file_size, prefetch):
        while True:
            fetch = self._pending.get(block_id)
            if fetch is None:
                break
            await fetch.done.wait()
            if fetch.data is not None:
                prefetched = self._prefetched.get(block_id)
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
        fetch = self._pending[block_id] = _Fetch()
        self._store_fetches += 1
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
            if self.disk is not None and not self.disk.offline:
                self._unwritten[block_id] = None
            if prefetch:
                self._keep_prefetched(block_id, data)
            else:
                self._put_in_memory(block_id, data)
        finally:
            self._store_fetches -= 1
            self._last_activity = time.monotonic()
            del self._pending[block_id]
            fetch.done.set()
        return data

    def _put_in_memory(self, block_id, data):
        self.memory.put(block_id, data)
        if block_id not in self.memory:     # bigger than the whole memory tier
            self._left_memory(block_id, data)

    def cached_blocks(self, key, etag, file_size):
        """(blocks of the object, blocks held in memory or on the SSD): for `warmup --check`."""
        blocks = (file_size + self.block_size - 1) // self.block_size
        held = 0
        for index in range(blocks):
            block_id = (key, etag, index)
            if block_id in self.memory or block_id in self._prefetched or \
                    self._on_its_way_to_disk(block_id) is not None:
                held += 1
            elif self.disk is not None and not self.disk.offline:
                name = self.disk.name(block_id)
                if self.disk.holds(name) or (not self.disk.index_ready
                                             and os.path.exists(self.disk.path(name))):
                    held += 1
        return blocks, held

    # -- SSD writes --

    def _left_memory(self, block_id, data):
        """A block leaves memory: queue it for the SSD if it is not there yet."""
        if block_id in self._unwritten:
            del self._unwritten[block_id]
            self._queue_for_disk(block_id, data, charged=True)
        elif block_id in self._not_charged:
            # queued while it was held in memory: its bytes now count against the memory tier
            self._not_charged.discard(block_id)
            self._charge(len(data))

    def _queue_for_disk(self, block_id, data, charged):
        """Queue a block for the SSD if there is room (else drop it from the SSD path: a cache,
        never data); `charged`: the block is no longer held in memory, its bytes count against
        the memory tier while it waits. False when dropped."""
        if self._on_its_way_to_disk(block_id) is not None:
            # fetched again while it waited (a reader whose SSD read found nothing): its bytes
            # are counted once, else the queue and the memory tier's charge would drift
            return True
        if self.disk.offline or self._queued_bytes + len(data) > self._queue_limit:
            self.disk.counters.skipped_writes += 1
            return False
        self._write_queue[block_id] = data
        self._queued_bytes += len(data)
        if charged:
            self._charge(len(data))
        else:
            self._not_charged.add(block_id)
        self._writers.unpark()
        return True

    def _unqueue(self, block_id, data):
        """A queued block leaves the queue (written, failed or dropped)."""
        self._queued_bytes -= len(data)
        if block_id in self._not_charged:
            self._not_charged.discard(block_id)
        else:
            self._charge(-len(data))

    def _charge(self, nbytes):
        """Queued bytes no longer held in memory change by `nbytes`: charge those beyond the
        queue's own allowance to the memory tier."""
        self._left_memory_bytes += nbytes
        self.memory.charge(max(0, self._left_memory_bytes - self._queue_allowance) -
                           self.memory.charged)

    def _on_its_way_to_disk(self, block_id):
        """The data of a block queued for the SSD or being written, else None."""
        data = self._write_queue.get(block_id)
        return data if data is not None else self._writing.get(block_id)

    def _held_in_memory(self, block_id):
        data = self.memory.get(block_id)
        if data is None:
            entry = self._prefetched.get(block_id)
            data = entry.data if entry is not None else None
        return data

    def _queue_unwritten(self):
        """Queue the oldest unwritten blocks for the SSD, while the queue has room."""
        while self._unwritten and not self.disk.offline:
            block_id = next(iter(self._unwritten))
            data = self._held_in_memory(block_id)
            if data is not None and self._queued_bytes + len(data) > self._queue_limit:
                return
            del self._unwritten[block_id]
            if data is not None:
                self._queue_for_disk(block_id, data, charged=False)

    async def _write_when_idle(self):
        """Write the blocks held in memory once nothing was read or fetched for `idle_after`
        seconds, keeping the queue short, so that a new epoch soon has the CPU again."""
        while True:
            idle = time.monotonic() - self._last_activity >= self.idle_after
            if self._unwritten and idle and not self._store_fetches:
                self._queue_unwritten()
            if self._write_queue or self._writing:
                await self._queue_room.park()     # until a writer finishes a block
            else:
                await trio.sleep(min(self.idle_after / 4, 0.25))

    async def flush(self):
        """Write every block not yet on the SSD (at unmount); nothing when the tier is offline."""
        if self.disk is None:
            return
        while not self.disk.offline:
            self._queue_unwritten()
            if not (self._write_queue or self._writing):
                return
            await self._queue_room.park()

    async def _disk_writer(self):
        disk = self.disk
        while True:
            if not self._write_queue:
                await self._writers.park()
                continue
            block_id, data = self._write_queue.popitem(last=False)
            self._writing[block_id] = data
            try:
                await self._write_block(disk, block_id, data)
            finally:
                del self._writing[block_id]
                self._unqueue(block_id, data)
                self._queue_room.unpark_all()

    async def _write_block(self, disk, block_id, data):
        name = disk.name(block_id)
        reserved = len(data) + _HEADER_ALLOWANCE
        victims = disk.admission(reserved)
        if victims is None:
            disk.counters.skipped_writes += 1
            return
        try:
            if victims:
                await self._unlink(victims)
            size, free, total = await self._disk_call(
                _DISK_DEADLINE, _write_and_measure, disk.path(name), block_id, data)
        except _DiskOffline:
            disk.write_abandoned(reserved)
            return
        except OSError as exc:
            disk.write_failed(reserved, exc)
            return
        self._enforce_disk_limits(disk.written(name, size, reserved, free, total))

    @property
    def disk_writes_pending(self):
        return len(self._unwritten) + len(self._write_queue) + len(self._writing)

    @property
    def disk_queue_bytes(self):
        """Bytes of the blocks queued for the SSD or being written."""
        return self._queued_bytes

    # -- prefetch --

    def _prefetch_after(self, key, etag, file_size, offset, end):
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
        for index in range(first, min(first + stream.window, last_block + 1)):
            block_id = (key, etag, index)
            if block_id in self._pending or block_id in self.memory or \
                    block_id in self._prefetched or \
                    self._on_its_way_to_disk(block_id) is not None:
                continue
            length = min(block_size, file_size - index * block_size)
            if not self._room_for_prefetch(length):
                self.counters.prefetch_dropped += 1
                return
            self.prefetch_in_flight += length
            # A block on the SSD is prefetched from there: whole 4 MiB reads in a worker thread
            # instead of four 1 MiB reads, each paying a thread hop and a cold-disk wait.
            on_disk = self.disk is not None and self.disk.holds(self.disk.name(block_id))
            self._nursery.start_soon(self._prefetch, block_id, file_size, length, on_disk)

    async def _prefetch_from_disk(self, block_id, length):
        """Read a whole block from the SSD into the prefetch buffer; False if it is not there
        (evicted, corrupt), so that the caller fetches it from the store instead."""
        if block_id in self._pending:
            return True
        fetch = self._pending[block_id] = _Fetch(from_disk=True)
        try:
            fetch.data = await self._read_disk(block_id, 0, length, in_thread=True)
        finally:
            del self._pending[block_id]
            fetch.done.set()
        if fetch.data is None:
            return False
        self._keep_prefetched(block_id, fetch.data, from_disk=True)
        self.counters.disk_prefetches += 1
        return True

    def _room_for_prefetch(self, length):
        """Make room in the prefetch budget (in flight + fetched) by dropping prefetched blocks
        that were read already, or that nobody read for a long time; never one still awaited,
        which a reader would then fetch a second time. False when there is no room."""
        needed = self.prefetch_in_flight + self._prefetched_bytes + length - self.prefetch_budget
        if needed <= 0:
            return True
        abandoned = time.monotonic() - _UNREAD_PREFETCH_TTL
        victims = []
        for block_id, entry in self._prefetched.items():
            if entry.read or entry.since < abandoned:
                victims.append(block_id)
                needed -= len(entry.data)
                if needed <= 0:
                    break
        if needed > 0:
            return False
        for block_id in victims:
            entry = self._prefetched.pop(block_id)
            self._prefetched_bytes -= len(entry.data)
            if entry.read and not entry.from_disk:
                # Read from the store and used, like a block a reader fetched itself: it joins
                # the memory tier rather than vanish, so that the memory tier holds the latest
                # blocks read whether they came by prefetch or not. (A block from the SSD stays
                # out of the memory tier: no churn between tiers.)
                self._put_in_memory(block_id, entry.data)
            else:
                self._left_memory(block_id, entry.data)
        return True

    def _keep_prefetched(self, block_id, data, from_disk=False):
        self._prefetched[block_id] = _Prefetched(data, from_disk)
        self._prefetched_bytes += len(data)

    @property
    def prefetch_memory_used(self):
        return self.prefetch_in_flight + self._prefetched_bytes

    async def _prefetch(self, block_id, file_size, length, on_disk):
        try:
            if on_disk and await self._prefetch_from_disk(block_id, length):
                return
            await self._fetch(block_id, file_size, prefetch=True)
            self.counters.prefetches += 1
            self.counters.prefetched_bytes += length
        except Exception as exc:
            # The reader that needs this block will fetch it and see the error itself.
            log.debug('prefetch of %s failed: %s', block_id, exc)
        finally:
            self.prefetch_in_flight -= length


def _write_and_measure(path, block_id, data):
    size = write_block_file(path, block_id, data)
    free, total = disk_free(path)
    return size, free, total
