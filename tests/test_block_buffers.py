"""Recycled block buffers (ufs/block_buffers.py, the rule in cache/blocks.py): a buffer is reused
only when nothing but the one giving it back refers to it, whoever else holds it (a reader's
memoryview, a container, a suspended task, a thread, C code through the buffer protocol); the
memory tier keeps room for the free buffers; and a block cache under eviction pressure, with
readers holding slices across awaits, serves every byte right while it stops allocating."""

import ctypes
import hashlib
import random
import sys
import threading

import pytest
import trio

from cachefs.cache.blocks import BlockCache
from cachefs.cache.memory import MemoryTier
from cachefs.ufs import block_buffers

SIZE = 4096


@pytest.fixture
def pool():
    yield block_buffers.configure(SIZE, 4)
    block_buffers.configure(0, 0)


def filled(pool, byte=0x5a):
    buffer = block_buffers.new_block_buffer(SIZE)
    buffer[:] = bytes([byte]) * SIZE
    return buffer


def test_a_buffer_only_its_caller_holds_is_reused_for_the_next_block(pool):
    buffer = filled(pool)
    identity = id(buffer)
    assert block_buffers.recycle(buffer)
    del buffer
    again = block_buffers.new_block_buffer(SIZE)
    assert id(again) == identity and pool.reused == 1


def test_recycling_is_on_only_on_interpreters_whose_count_sees_every_holder():
    # CI's Python (3.11) counts every frame's reference; from 3.14 references may be borrowed
    assert block_buffers.RECYCLING == (sys.version_info < (3, 14))


def test_with_recycling_off_no_buffer_is_kept(pool, monkeypatch):
    monkeypatch.setattr(block_buffers, 'RECYCLING', False)
    buffer = filled(pool)
    assert not block_buffers.recycle(buffer)
    assert pool.free == []


def test_pool_give_back_counts_references_the_same_way(pool):
    buffer = filled(pool)
    assert pool.give_back(buffer)
    other = filled(pool)
    view = memoryview(other)
    assert not pool.give_back(other)
    view.release()


def hold_with_memoryview_slice(buffer):
    return memoryview(buffer)[10:20]


def hold_in_list(buffer):
    return [buffer]


def hold_in_dict(buffer):
    return {('key', 'etag', 0): buffer}


def hold_as_attribute(buffer):
    class Entry:
        pass
    entry = Entry()
    entry.data = buffer
    return entry


def hold_through_ctypes(buffer):
    # C code holding a Py_buffer of it (as pyfuse3 does while it replies)
    return (ctypes.c_char * SIZE).from_buffer(buffer)


def hold_in_closure(buffer):
    return lambda: buffer


@pytest.mark.parametrize('hold', [hold_with_memoryview_slice, hold_in_list, hold_in_dict,
                                  hold_as_attribute, hold_through_ctypes, hold_in_closure])
def test_a_buffer_something_else_holds_is_never_reused(pool, hold):
    buffer = filled(pool)
    holder = hold(buffer)
    assert not block_buffers.recycle(buffer)
    assert pool.free == [] and pool.refused == 1
    fresh = block_buffers.new_block_buffer(SIZE)
    assert fresh is not buffer
    del holder


def give_back_a_parameter(buffer):
    return block_buffers.recycle(buffer)


def test_a_buffer_given_back_by_a_callee_while_its_caller_holds_it_is_never_reused(pool):
    # the caller's reference must not pass for the giver's own (a borrowed parameter, 3.14)
    buffer = filled(pool)
    assert not give_back_a_parameter(buffer)
    assert pool.free == [] and pool.refused == 1


def test_a_buffer_a_suspended_task_holds_is_never_reused(pool):
    async def main():
        buffer = filled(pool)
        started = trio.Event()
        release = trio.Event()

        async def reader(data):
            view = memoryview(data)[:100]
            started.set()
            await release.wait()
            return bytes(view)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, buffer)
            await started.wait()
            assert not block_buffers.recycle(buffer)
            release.set()
    trio.run(main)


def test_a_buffer_a_thread_holds_is_never_reused(pool):
    buffer = filled(pool)
    holding = threading.Event()
    done = threading.Event()

    def writer(data):
        holding.set()
        done.wait(10)
        return len(data)
    thread = threading.Thread(target=writer, args=(buffer,))
    thread.start()
    try:
        holding.wait(10)
        assert not block_buffers.recycle(buffer)
    finally:
        done.set()
        thread.join()


def test_only_bytearrays_of_the_block_size_are_kept_and_at_most_capacity(pool):
    assert not block_buffers.recycle(bytes(SIZE))
    assert not block_buffers.recycle(bytearray(SIZE - 1))
    kept = [block_buffers.recycle(bytearray(SIZE)) for _ in range(6)]
    assert kept == [True] * 4 + [False] * 2
    short = block_buffers.new_block_buffer(SIZE - 10)      # a last block: never from the pool
    assert len(short) == SIZE - 10 and len(pool.free) == 4


def test_the_memory_tier_recycles_evicted_blocks_nobody_holds_and_keeps_room_for_them(pool):
    tier = MemoryTier(8 * SIZE, recycle=block_buffers.recycle, reserve=2 * SIZE)
    views = {}
    for index in range(12):
        buffer = filled(pool, byte=index)
        assert all(buffer is not view.obj for view in views.values())
        tier.put(('key', 'etag', index), buffer)
        if index == 1:
            views[index] = memoryview(buffer)[:SIZE]     # a reader still holds block 1
        del buffer
        assert tier.used + tier.reserve <= tier.capacity
    assert len(tier) == 6 and tier.evictions == 6
    # blocks 0 and 2-5 went back to the pool (and were reused by the puts after them)
    assert pool.reused + len(pool.free) == 5 and pool.refused == 1
    assert bytes(views[1]) == bytes([1]) * SIZE


class PatternStore:
    """A store whose every block is a pattern of its own (object, block index), read into a
    buffer from block_buffers as the lean read path does."""

    def __init__(self, block_size, sizes):
        self.block_size = block_size
        self.sizes = sizes
        self.reads = 0

    @staticmethod
    def pattern(key, offset, length):
        seed = hashlib.sha256(f'{key}:{offset}'.encode()).digest()
        return (seed * (length // len(seed) + 1))[:length]

    async def read(self, key, etag, offset, length):
        self.reads += 1
        data = block_buffers.new_block_buffer(length)
        await trio.sleep(random.random() / 1000)
        half = length // 2
        data[:half] = self.pattern(key, offset, length)[:half]
        await trio.sleep(0)
        data[half:] = self.pattern(key, offset, length)[half:]
        return data


BLOCK = 64 * 1024
SIZES = {f'shard-{i}': BLOCK * 5 + 1000 * i for i in range(12)}
EXPECTED = {key: b''.join(PatternStore.pattern(key, offset, min(BLOCK, size - offset))
                          for offset in range(0, size, BLOCK))
            for key, size in SIZES.items()}


def run_epochs(cache, readers, keep, epochs=3):
    """`epochs` passes over SIZES by `readers` concurrent tasks, each keeping its last `keep`
    slices across awaits and checking every byte of each; returns the pool's `allocated`
    after each epoch."""
    allocated = []

    async def reader(keys, rng):
        held = []
        for key in keys:
            size = SIZES[key]
            offset = 0
            while offset < size:
                length = rng.choice((4096, 65536, 100_000))
                data = await cache.read(key, 'etag', size, offset, length)
                held.append((key, offset, data))
                if len(held) > keep:
                    old_key, old_offset, old = held.pop(0)
                    assert bytes(old) == EXPECTED[old_key][old_offset:old_offset + len(old)]
                await trio.sleep(0)
                offset += length
        for old_key, old_offset, old in held:
            assert bytes(old) == EXPECTED[old_key][old_offset:old_offset + len(old)]

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            for epoch in range(epochs):
                rng = random.Random(epoch)
                keys = list(SIZES)
                rng.shuffle(keys)
                async with trio.open_nursery() as tasks:
                    for number in range(readers):
                        tasks.start_soon(reader, keys[number::readers], random.Random(number))
                allocated.append(cache.buffers.allocated)
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        block_buffers.configure(0, 0)
    return allocated


def new_cache(prefetch):
    store = PatternStore(BLOCK, SIZES)
    return BlockCache(store, BLOCK, 16 * BLOCK, prefetch_window=4 * BLOCK if prefetch else 0,
                      prefetch_memory=8 * BLOCK if prefetch else 0)


@pytest.mark.parametrize('prefetch', [True, False], ids=['prefetch', 'no-prefetch'])
def test_many_readers_holding_slices_under_eviction_pressure_read_every_byte(prefetch):
    cache = new_cache(prefetch)
    assert cache.buffers.capacity == 2 and cache.memory.reserve == 2 * BLOCK
    run_epochs(cache, readers=12, keep=6)
    assert cache.buffers.reused > 0 and cache.buffers.refused > 0


def test_once_the_memory_tier_is_full_fetching_allocates_only_the_short_last_blocks():
    cache = new_cache(prefetch=False)
    allocated = run_epochs(cache, readers=1, keep=0)
    short_blocks = sum(1 for size in SIZES.values() if size % BLOCK)
    # the third epoch fetched every full block again (the tier holds 14 of 70), into reused
    # buffers; only last blocks shorter than a block (never pooled) were allocated
    assert allocated[2] - allocated[1] <= short_blocks
    assert cache.buffers.reused >= 2 * (sum(SIZES.values()) // BLOCK - 16)
