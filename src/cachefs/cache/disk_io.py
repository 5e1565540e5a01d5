"""Every call the block cache makes to the SSD tier: reads (inline on the trio thread or in a
worker thread), writes, unlinks, the start-up probe and scan, each in the tier's own thread pool
under a deadline; the tier going offline when a call misses its deadline, and the probe that
brings it back.

The rules these follow (which calls may run on the trio thread, the deadlines, what offline
means, why a stuck thread is abandoned) are written once, in cachefs.cache.blocks's module
docstring ("A disk that stops answering" and "Concurrency rules").
"""

from __future__ import annotations

import errno
import logging
import os
import time

from typing import Any, Callable, Optional, TypeVar

import cachetools
import trio

from .counters import CacheCounters
from .disk import (CorruptBlock, DiskTier, Header, disk_free, probe, read_block_file, scan,
                   unlink_quietly, write_block_file)
from .memory import Block, BlockId

log = logging.getLogger(__name__)

_DISK_THREADS = 16           # worker threads for SSD I/O (their own pool: see "A disk that ...")
_DISK_READ_DEADLINE = 5.0    # an SSD read that takes longer is served from the store ...
_DISK_DEADLINE = 15.0        # ... and any SSD call that takes longer takes the tier offline
_INLINE_READ_MAX = 262144    # SSD reads up to this size may run on the trio thread ...
_SLOW_INLINE_READ = 0.002    # ... while they take less than this on average ...
_STALLED_INLINE_READ = 0.05  # ... and none takes longer than this ...
_INLINE_PAUSE = 5.0          # ... else they go to worker threads for this long
_HEADER_ALLOWANCE = 8192     # a block file's header and alignment, reserved before writing

_T = TypeVar('_T')


class DiskOffline(Exception):
    """The SSD tier is offline, or a call to it just missed its deadline."""


class DiskIO:
    """The SSD tier's calls, for one block cache. `nursery` (set by the block cache's run())
    runs the unlinks and the probe; `on_offline` (set by the block cache) drops what waits to
    be written when the tier goes offline."""

    def __init__(self, disk: DiskTier, counters: CacheCounters, probe_interval: float) -> None:
        self.disk = disk
        self.counters = counters
        self.probe_interval = probe_interval
        self.nursery: trio.Nursery
        self.on_offline: Callable[[], None] = lambda: None
        self.nowait_works = False       # until the start-up probe says the disk takes RWF_NOWAIT
        self._inline_reads_after = 0.0  # time.monotonic() from which small SSD reads run inline
        self._inline_read_time = 0.0    # their moving average, seconds
        self._headers: cachetools.LRUCache[str, Header] = \
            cachetools.LRUCache(maxsize=65536)   # block file name -> Header
        self._limiter = trio.CapacityLimiter(_DISK_THREADS)
        self._calls: set[trio.CancelScope] = set()     # cancel scopes of the calls under way

    # -- start-up, unlinks --

    async def index(self) -> None:
        """The start-up probe (does the disk take RWF_NOWAIT?) and scan of the SSD tier."""
        try:
            self.nowait_works = await self.call(_DISK_DEADLINE, probe, self.disk.folder)
            # No deadline for the scan of a big cache; reads do not wait for it.
            found = await self.call(None, scan, self.disk.folder)
        except DiskOffline:
            return
        except OSError as exc:
            self.stuck(f'the start-up probe failed ({exc.strerror})')
            return
        self.disk.merge_scan(found)
        self.enforce_limits(self.disk.admission(0))

    def enforce_limits(self, victims: Optional[list[str]]) -> None:
        """Unlink the block files the SSD tier evicted, in the background."""
        if victims:
            self.nursery.start_soon(self._unlink_quietly, victims)

    async def unlink(self, names: list[str]) -> None:
        for name in names:
            self._headers.pop(name, None)
        await self.call(_DISK_DEADLINE, unlink_quietly, [self.disk.path(n) for n in names])

    async def _unlink_quietly(self, names: list[str]) -> None:
        try:
            await self.unlink(names)
        except DiskOffline:
            pass

    # -- a disk that stops answering --

    async def call(self, deadline: Optional[float], fn: Callable[..., _T], *args: Any,
                   probing: bool = False) -> _T:
        """fn(*args) in a thread of the SSD tier's pool, within `deadline` seconds (None: no
        limit) counted from now, waiting for a thread included. Raises DiskOffline when the
        tier is offline, or when the call misses its deadline, which takes the tier offline."""
        if self.disk.offline and not probing:
            raise DiskOffline
        with trio.move_on_after(float('inf') if deadline is None else deadline) as scope:
            self._calls.add(scope)
            try:
                # abandon_on_cancel: a thread stuck in the disk's syscall cannot be interrupted;
                # it keeps its slot in _limiter (not trio's default pool) until it returns.
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                     abandon_on_cancel=True)
            finally:
                self._calls.discard(scope)
        # Cancelled: by its deadline, or by stuck() (another call missed its own; a call
        # without a deadline, such as the start-up scan, ends only that way).
        if not probing and not self.disk.offline:
            self.stuck(f'{fn.__name__} took more than {deadline:g} s')
        raise DiskOffline

    def stuck(self, reason: str) -> None:
        """Stop using the disk: abandon the calls under way, drop what was to be written
        (on_offline: a cache, never data), and probe the disk until it answers."""
        if self.disk.offline:
            return
        self.disk.go_offline(reason)
        for scope in self._calls:     # nobody waits for the other calls under way
            scope.cancel()
        self.on_offline()
        self.nursery.start_soon(self._probe_until_back)

    async def _probe_until_back(self) -> None:
        while True:
            await trio.sleep(self.probe_interval)
            try:
                await self.call(_DISK_DEADLINE, probe, self.disk.folder, probing=True)
            except (DiskOffline, OSError) as exc:
                log.debug('the SSD tier still does not answer: %r', exc)
                continue
            self.disk.back_online()
            if not self.disk.index_ready:   # the start-up scan was cut short: run it now
                self.nursery.start_soon(self.index)
            return

    # -- reads --

    async def read(self, block_id: BlockId, start: int, length: int,
                   in_thread: bool = False) -> Optional[Block]:
        """`length` bytes of a block from `start`, or None when the SSD tier cannot serve
        them (not there, corrupt, unreadable, offline): the caller reads from the store.
        `in_thread`: a whole block for the prefetch buffer, read in a worker thread, not
        counted as a hit until it is read."""
        disk = self.disk
        name = disk.name(block_id)
        if disk.offline or not disk.may_hold(name):
            return None
        path = disk.path(name)
        header = self._headers.get(name)
        try:
            try:
                if in_thread or not self.nowait_works:
                    raise BlockingIOError
                header, data = read_block_file(path, block_id, start, length, header,
                                               os.RWF_NOWAIT)
            except BlockingIOError:
                if not in_thread and self.nowait_works and length <= _INLINE_READ_MAX and \
                        time.monotonic() >= self._inline_reads_after:
                    header, data = self._read_inline(path, block_id, start, length, header)
                else:
                    header, data = await self.call(
                        _DISK_READ_DEADLINE, read_block_file, path, block_id, start, length,
                        header)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # overlayfs on older kernels refuses RWF_NOWAIT on some files: read in threads.
                log.info('the cache file system does not support RWF_NOWAIT; SSD reads go '
                         'through worker threads')
                self.nowait_works = False
                header, data = await self.call(
                    _DISK_READ_DEADLINE, read_block_file, path, block_id, start, length, header)
        except DiskOffline:
            return None         # the tier is offline now: the caller reads from the store
        except FileNotFoundError:
            self._headers.pop(name, None)
            disk.forget(name)
            return None
        except CorruptBlock as exc:
            log.debug('%s: %s', path, exc)
            disk.corrupt(name)
            self.enforce_limits([name])
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

    def _read_inline(self, path: str, block_id: BlockId, start: int, length: int,
                     header: Optional[Header]) -> tuple[Header, Block]:
        """A small SSD read on the trio thread; when these are slow (on average, or one very
        slow), the next ones go to worker threads for a while."""
        started = time.monotonic()
        result = read_block_file(path, block_id, start, length, header)
        elapsed = time.monotonic() - started
        if elapsed > _DISK_READ_DEADLINE:
            self.stuck(f'an SSD read on the event loop took {elapsed:.0f} s')
        self._inline_read_time += (elapsed - self._inline_read_time) / 16    # moving average
        if self._inline_read_time > _SLOW_INLINE_READ or elapsed > _STALLED_INLINE_READ:
            log.info('small SSD reads take %.1f ms (average; the last %.1f ms): they go through '
                     'worker threads for %.0f s', self._inline_read_time * 1e3, elapsed * 1e3,
                     _INLINE_PAUSE)
            self._inline_reads_after = time.monotonic() + _INLINE_PAUSE
            self._inline_read_time = 0.0
        return result

    # -- writes --

    async def write(self, block_id: BlockId, data: Block) -> None:
        """Write a block file, if the SSD tier admits it (else it counts a skipped write),
        unlinking what the tier evicts to make room or to stay within its limits."""
        disk = self.disk
        name = disk.name(block_id)
        reserved = len(data) + _HEADER_ALLOWANCE
        victims = disk.admission(reserved)
        if victims is None:
            disk.counters.skipped_writes += 1
            return
        try:
            if victims:
                await self.unlink(victims)
            size, free, total = await self.call(
                _DISK_DEADLINE, _write_and_measure, disk.path(name), block_id, data)
        except DiskOffline:
            disk.write_abandoned(reserved)
            return
        except OSError as exc:
            disk.write_failed(reserved, exc)
            return
        self.enforce_limits(disk.written(name, size, reserved, free, total))


def _write_and_measure(path: str, block_id: BlockId, data: Block) -> tuple[int, int, int]:
    size = write_block_file(path, block_id, data)
    free, total = disk_free(path)
    return size, free, total
