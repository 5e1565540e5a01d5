"""Where the buffers that store reads fill come from: one place, so that how block memory is
allocated (fresh, reused) is decided here and not in every read path.

The reads that fill a buffer of their own (the trio paths of S3 and OSS, `s3_trio`'s
PooledGetter, and the cluster tier's reads from peers, cache/cluster_protocol.py) take the
buffer for a block from `new_block_buffer`, and must fill every byte of it before anyone else
sees it (they do: a short answer raises and the buffer is dropped). So a buffer is handed out
without being zeroed: a recycled one still holds an older block until the read overwrites it,
and a fresh one is not zeroed either: malloc may serve it from memory this process freed
(glibc raises its mmap threshold after the first freed block, and block-sized buffers then come
from the heap with whatever was there: measured, 128 KiB of an older block's bytes in a fresh
4 MiB buffer). A byte left unfilled would show a reader another block's, or the daemon's, bytes.

Recycling: the block cache gives back (`recycle`) the buffer of a block that left it for good (a
block evicted from the memory tier, or written to the SSD after leaving memory); the buffer is
kept in a small free list and the next store read of a whole block reuses it, so that once the
memory tier is full a cold epoch allocates no new block memory: no fresh pages for the kernel to
zero, no page faults (bench/RESULTS.md put 19% of a cold epoch's daemon time in zeroing the
pages of new block buffers). How many buffers the list keeps, and what they count against in
the memory budget, is the block cache's to say (`configure`; cache/memory.py keeps that many
blocks of the memory tier's capacity free for them).

The one rule that makes this safe: a buffer is reused only when nothing else refers to it. A
reader slicing it (memoryview), a FUSE reply in progress (pyfuse3 holds a Py_buffer, which holds
a reference), the SSD write queue or a writer thread (an abandoned one too), a prefetch, a waiter
of the fetch: each holds a reference. `recycle` counts the buffer's references
(`sys.getrefcount`) and keeps it only when they are exactly the caller's own, as measured once
at import with the same call shape (`_UNSHARED`); anything more and the buffer is left to the
garbage collector. A caller gives back a buffer it holds in one local variable and then drops,
a variable it assigned itself (taken out of a container), not a parameter it was passed: from
Python 3.14 a parameter may hold a borrowed reference that getrefcount does not count, and the
count would then take its caller's reference for the giver's own (3.11-3.13 count every frame's
reference; `_UNSHARED` is 4 there). tests/test_block_buffers.py checks the rule on the running
interpreter.
Everything here runs on the trio thread (list appends and pops are atomic anyway).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# PyByteArray_FromStringAndSize(NULL, n): a bytearray of n bytes whose contents are not set
# (`bytearray(n)` writes n zero bytes first, touching every page before the read fills it).
_uninitialized = ctypes.pythonapi.PyByteArray_FromStringAndSize
_uninitialized.restype = ctypes.py_object
_uninitialized.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _references(buffer: object) -> int:
    return sys.getrefcount(buffer)


def _recycle_shaped(buffer: object) -> int:
    """The references recycle() sees for a buffer only its caller holds (same call shape)."""
    return _references(buffer)


def _measure_unshared() -> int:
    probe = bytearray(1)        # held by this one local variable, like the caller's block
    return _recycle_shaped(probe)


_UNSHARED = _measure_unshared()


def _holder_is_counted() -> bool:
    """Whether one more holder of a buffer shows in the count seen through recycle()'s call
    shape: the whole mechanism rests on it."""
    probe = bytearray(1)
    holders = [probe]
    shared = _recycle_shaped(probe)
    del holders
    return shared == _UNSHARED + 1


# Recycling is on only where the count was checked to see every holder: Python before 3.14
# (from 3.14 the interpreter may borrow references that getrefcount does not count, so a call
# site unlike the calibration's could take a reader's reference for the giver's own: a wrong
# byte). Elsewhere buffers are simply not reused (what the cache did before recycling).
RECYCLING = sys.version_info < (3, 14) and _holder_is_counted()


class BufferPool:
    """Free buffers of exactly `size` bytes, at most `capacity` of them."""
    __slots__ = ('size', 'capacity', 'free', 'reused', 'allocated', 'refused')

    def __init__(self, size: int = 0, capacity: int = 0) -> None:
        self.size = size
        self.capacity = capacity
        self.free: list[bytearray] = []
        self.reused = 0         # buffers handed out again
        self.allocated = 0      # buffers made fresh
        self.refused = 0        # buffers given back while something still held them

    def take(self, length: int) -> bytearray:
        if length == self.size and self.free:
            self.reused += 1
            if self.reused == 1:
                log.debug('reusing the buffers of blocks nobody reads any more (%d bytes, up to '
                          '%d kept)', self.size, self.capacity)
            return self.free.pop()
        self.allocated += 1
        buffer: bytearray = _uninitialized(None, length)
        return buffer

    def give_back(self, buffer: object) -> bool:
        """Keep `buffer` for reuse if it is one of ours, there is room, and nothing but the
        caller refers to it (see the module docstring). The caller holds it in one local
        variable and calls this directly (`pool.give_back(name)`)."""
        references = _references(buffer)      # before `buffer` is pushed as an argument
        return self._keep(buffer, references)

    def _keep(self, buffer: object, references: int) -> bool:
        """`references`: as counted one call below the caller (the shape of _UNSHARED)."""
        if not RECYCLING or type(buffer) is not bytearray or len(buffer) != self.size or \
                self.size == 0:
            return False
        if len(self.free) >= self.capacity:
            return False
        if references > _UNSHARED:
            self.refused += 1
            return False
        self.free.append(buffer)
        return True

    def clear(self) -> None:
        self.free.clear()


_pool = BufferPool()


def configure(size: int, capacity: int) -> BufferPool:
    """Recycle buffers of `size` bytes, keeping at most `capacity` free ones (0: none). The
    daemon has one block cache; a second one configured in the same process (tests) replaces
    the pool, and the first one's buffers are then simply not reused."""
    global _pool
    _pool = BufferPool(size, capacity)
    return _pool


def pool() -> BufferPool:
    return _pool


def new_block_buffer(length: int) -> bytearray:
    """A writable buffer of exactly `length` bytes for one block read from the store; its
    contents are not set: the caller fills every byte before it is seen."""
    return _pool.take(length)


def recycle(buffer: object) -> bool:
    """Give back the buffer of a block nobody reads any more (see the module docstring): kept
    for the next store read if nothing else refers to it. True when kept."""
    references = _references(buffer)      # before `buffer` is pushed as an argument
    return _pool._keep(buffer, references)
