"""Deferred (write-back) SSD writes: which blocks held in memory are not on the SSD yet, the
queue of blocks waiting for the writers and its memory budget (charged to the memory tier), the
writers, writing once reads stop for a moment, and the flush at unmount.

The rules (when a block goes to the SSD, the queue's room and what happens when it is full,
what a reader sees while a block waits, what an offline tier drops) are written once, in
cachefs.cache.blocks's module docstring.
"""

from __future__ import annotations

import logging

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

import trio

from ..ufs import block_buffers
from .memory import Block, BlockId, MemoryTier

if TYPE_CHECKING:
    from .disk_io import DiskIO
    from .prefetch import PrefetchBuffer

log = logging.getLogger(__name__)

_MIN_QUEUED_BLOCKS = 8       # blocks that may wait for the SSD outside the memory tier's budget


class WriteBack:
    """The blocks on their way to the SSD tier (`disk_io`; None: no SSD tier, and nothing is
    ever queued)."""

    def __init__(self, block_size: int, memory: MemoryTier, prefetched: PrefetchBuffer,
                 disk_io: Optional[DiskIO]) -> None:
        self.memory = memory
        self.prefetched = prefetched
        self.disk_io = disk_io
        # Block ids held in memory (tier or prefetch buffer) and not yet written, in fetch
        # order; then the blocks queued for the writers, readable until written.
        self._unwritten: dict[BlockId, None] = {}
        self.queue: OrderedDict[BlockId, Block] = OrderedDict()
        self._writing: dict[BlockId, Block] = {}    # in a writer's hands
        self.queued_bytes = 0                       # in both
        # Their room: a few blocks of their own (as the writers' buffers), and beyond those up
        # to half the memory tier, charged to it (its LRU shrinks while they wait). The queued
        # blocks still held in memory too (queued while idle, or at unmount) are not charged.
        self._queue_allowance = _MIN_QUEUED_BLOCKS * block_size
        self._queue_limit = self._queue_allowance + memory.capacity // 2
        self._not_charged: set[BlockId] = set()
        self._left_memory_bytes = 0     # queued bytes no longer held in memory
        self._writers = trio.lowlevel.ParkingLot()    # writers waiting for work
        self._queue_room = trio.lowlevel.ParkingLot()  # woken when a write ends, or at offline

    @property
    def pending(self) -> int:
        """Blocks not on the SSD yet: held in memory, queued, or being written."""
        return len(self._unwritten) + len(self.queue) + len(self._writing)

    def _offline(self) -> bool:
        return self.disk_io is None or self.disk_io.disk.offline

    # -- blocks entering and leaving memory --

    def fetched(self, block_id: BlockId) -> None:
        """A block fetched from the store, now held in memory, goes to the SSD later."""
        if not self._offline():
            self._unwritten[block_id] = None

    def put_in_memory(self, block_id: BlockId, data: Block) -> None:
        self.memory.put(block_id, data)
        if block_id not in self.memory:     # bigger than the whole memory tier
            self.left_memory(block_id, data)

    def left_memory(self, block_id: BlockId, data: Block) -> None:
        """A block leaves memory: queue it for the SSD if it is not there yet."""
        if block_id in self._unwritten:
            del self._unwritten[block_id]
            self._queue(block_id, data, charged=True)
        elif block_id in self._not_charged:
            # queued while it was held in memory: its bytes now count against the memory tier
            self._not_charged.discard(block_id)
            self._charge(len(data))

    def on_its_way_to_disk(self, block_id: BlockId) -> Optional[Block]:
        """The data of a block queued for the SSD or being written, else None."""
        data = self.queue.get(block_id)
        return data if data is not None else self._writing.get(block_id)

    # -- the queue and its room --

    def _queue(self, block_id: BlockId, data: Block, charged: bool) -> bool:
        """Queue a block for the SSD if there is room (else drop it from the SSD path: a cache,
        never data); `charged`: the block is no longer held in memory, its bytes count against
        the memory tier while it waits. False when dropped."""
        if self.on_its_way_to_disk(block_id) is not None:
            # fetched again while it waited (a reader whose SSD read found nothing): its bytes
            # are counted once, else the queue and the memory tier's charge would drift
            return True
        assert self.disk_io is not None     # only blocks fetched while there is a tier
        if self.disk_io.disk.offline or self.queued_bytes + len(data) > self._queue_limit:
            self.disk_io.disk.counters.skipped_writes += 1
            return False
        self.queue[block_id] = data
        self.queued_bytes += len(data)
        if charged:
            self._charge(len(data))
        else:
            self._not_charged.add(block_id)
        self._writers.unpark()
        return True

    def _unqueue(self, block_id: BlockId, data: Block) -> None:
        """A queued block leaves the queue (written, failed or dropped)."""
        self.queued_bytes -= len(data)
        if block_id in self._not_charged:
            self._not_charged.discard(block_id)
        else:
            self._charge(-len(data))

    def _charge(self, nbytes: int) -> None:
        """Queued bytes no longer held in memory change by `nbytes`: charge those beyond the
        queue's own allowance to the memory tier."""
        self._left_memory_bytes += nbytes
        self.memory.charge(max(0, self._left_memory_bytes - self._queue_allowance) -
                           self.memory.charged)

    def _held_in_memory(self, block_id: BlockId) -> Optional[Block]:
        data = self.memory.get(block_id)
        if data is None:
            data = self.prefetched.held(block_id)
        return data

    def _queue_unwritten(self) -> None:
        """Queue the oldest unwritten blocks for the SSD, while the queue has room."""
        while self._unwritten and not self._offline():
            block_id = next(iter(self._unwritten))
            data = self._held_in_memory(block_id)
            if data is not None and self.queued_bytes + len(data) > self._queue_limit:
                return
            del self._unwritten[block_id]
            if data is not None:
                self._queue(block_id, data, charged=False)

    def drop_queue(self) -> None:
        """The SSD tier went offline: forget what was to be written (a cache, never data), and
        wake whoever waits for the queue."""
        assert self.disk_io is not None
        self._unwritten.clear()
        while self.queue:
            block_id, data = self.queue.popitem(last=False)
            self._unqueue(block_id, data)
            self.disk_io.disk.counters.skipped_writes += 1
        self._queue_room.unpark_all()

    # -- writing --

    async def write_when_idle(self, idle_after: float, idle: Callable[[], bool]) -> None:
        """Write the blocks held in memory once `idle()` (nothing was read or fetched for
        `idle_after` seconds), keeping the queue short, so that a new epoch soon has the CPU
        again."""
        while True:
            if self._unwritten and idle():
                self._queue_unwritten()
            if self.queue or self._writing:
                await self._queue_room.park()     # until a writer finishes a block
            else:
                await trio.sleep(min(idle_after / 4, 0.25))

    async def flush(self) -> None:
        """Write every block not yet on the SSD (at unmount); nothing when the tier is offline."""
        if self.disk_io is None:
            return
        while not self.disk_io.disk.offline:
            self._queue_unwritten()
            if not (self.queue or self._writing):
                return
            await self._queue_room.park()

    async def writer(self) -> None:
        """One SSD writer: writes the queued blocks, oldest first."""
        disk_io = self.disk_io
        assert disk_io is not None
        while True:
            if not self.queue:
                await self._writers.park()
                continue
            block_id, data = self.queue.popitem(last=False)
            self._writing[block_id] = data
            try:
                await disk_io.write(block_id, data)
            finally:
                del self._writing[block_id]
                self._unqueue(block_id, data)
                self._queue_room.unpark_all()
            # Written: unless something still holds it (the memory tier, a reader, a writer
            # thread abandoned by a deadline), its buffer is reused (cache/blocks.py)
            block_buffers.recycle(data)
