"""Unit tests of the block cache's SSD logic (a real SSD tier in a temporary folder and an
in-memory store: no mount, no server): deferred writes, and small SSD reads on the trio thread
while they are fast."""

import hashlib
import threading
import time

import trio

from cachefs.cache import disk_io, writeback
from cachefs.cache.blocks import BlockCache
from cachefs.cache.disk import DiskTier

BLOCK = 4096
OBJECT = bytes(range(256)) * (BLOCK * 6 // 256) + b'tail'      # 6 blocks and a short 7th
BLOCKS = (len(OBJECT) + BLOCK - 1) // BLOCK


class MemoryStore:
    """Serves ranges of one object and counts the requests."""

    def __init__(self):
        self.reads = 0

    async def read(self, key, etag, offset, length):
        self.reads += 1
        await trio.sleep(0)
        return OBJECT[offset:offset + length]


def block_files(tmp_path):
    return sorted((tmp_path / 'blocks').glob('*/*.blk'))


async def read_all(cache):
    parts = [bytes(await cache.read('key', 'etag', len(OBJECT), offset, BLOCK))
             for offset in range(0, len(OBJECT), BLOCK)]
    return b''.join(parts)


async def wait_for(condition, seconds=10):
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


def cache_on(tmp_path, store, memory_blocks, idle_after):
    disk = DiskTier(str(tmp_path), BLOCK, capacity=1 << 30, min_free_ratio=0, eviction='lru')
    return BlockCache(store, BLOCK, memory_blocks * BLOCK, disk, idle_after=idle_after)


async def test_blocks_reach_the_ssd_when_evicted_from_memory_and_at_flush(tmp_path, nursery):
    store = MemoryStore()
    cache = cache_on(tmp_path, store, memory_blocks=3, idle_after=3600)   # never idle here
    await nursery.start(cache.run)
    assert await read_all(cache) == OBJECT
    # The 4 blocks evicted from the memory tier go to the SSD; the 3 it holds wait.
    await wait_for(lambda: len(block_files(tmp_path)) == BLOCKS - 3)
    assert cache.disk_writes_pending == 3
    await cache.flush()
    assert len(block_files(tmp_path)) == BLOCKS and cache.disk_writes_pending == 0
    # Every block is now served from the SSD tier or memory: no second store read.
    reads = store.reads
    assert hashlib.sha256(await read_all(cache)).digest() == hashlib.sha256(OBJECT).digest()
    assert store.reads == reads


async def test_blocks_reach_the_ssd_once_reads_stop(tmp_path, nursery):
    store = MemoryStore()
    cache = cache_on(tmp_path, store, memory_blocks=64, idle_after=0.05)
    await nursery.start(cache.run)
    assert await read_all(cache) == OBJECT
    await wait_for(lambda: cache.disk_writes_pending == 0)
    assert len(block_files(tmp_path)) == BLOCKS
    # A new cache on the same folder (a remount) serves every block from the SSD.
    fresh_store = MemoryStore()
    fresh = cache_on(tmp_path, fresh_store, memory_blocks=64, idle_after=0.05)
    await nursery.start(fresh.run)
    assert await read_all(fresh) == OBJECT
    assert fresh_store.reads == 0 and fresh.counters.disk_hits == BLOCKS


async def test_a_block_on_its_way_to_the_ssd_is_served_from_memory(tmp_path, nursery):
    store = MemoryStore()
    cache = cache_on(tmp_path, store, memory_blocks=0, idle_after=3600)  # every block evicted
    # The writers are not started: blocks stay queued, and must still be served.
    assert await read_all(cache) == OBJECT
    assert cache.disk_writes_pending == BLOCKS and not block_files(tmp_path)
    reads = store.reads
    assert await read_all(cache) == OBJECT
    assert store.reads == reads


async def test_small_ssd_reads_leave_the_trio_thread_after_a_slow_one(tmp_path, nursery,
                                                                      monkeypatch):
    store = MemoryStore()
    cache = cache_on(tmp_path, store, memory_blocks=64, idle_after=3600)
    await nursery.start(cache.run)
    assert await read_all(cache) == OBJECT
    await cache.flush()
    fresh = cache_on(tmp_path, MemoryStore(), memory_blocks=64, idle_after=3600)
    await nursery.start(fresh.run)
    await wait_for(lambda: fresh.disk.index_ready)
    fresh._disk_io.nowait_works = True      # a local disk (the start-up probe says so on ext4, xfs)
    on_trio_thread = []
    read_block_file = disk_io.read_block_file

    def observed_read(*args):
        if len(args) > 5 and args[5]:
            raise BlockingIOError       # RWF_NOWAIT: as if no file were in the page cache
        on_trio_thread.append(threading.current_thread() is threading.main_thread())
        if len(on_trio_thread) == 2:
            time.sleep(0.06)                # the second read stalls
        return read_block_file(*args)
    monkeypatch.setattr(disk_io, 'read_block_file', observed_read)
    assert await read_all(fresh) == OBJECT
    assert on_trio_thread == [True, True] + [False] * (BLOCKS - 2)
    assert fresh.counters.disk_hits == BLOCKS


async def test_a_start_up_scan_cut_short_by_an_offline_disk_runs_again_once_it_is_back(
        tmp_path, nursery, monkeypatch):
    scanning = threading.Event()
    release = threading.Event()
    scan = disk_io.scan

    def stalled_scan(folder):
        if not release.is_set():
            scanning.set()
            release.wait(10)
        return scan(folder)
    monkeypatch.setattr(disk_io, 'scan', stalled_scan)
    cache = cache_on(tmp_path, MemoryStore(), memory_blocks=64, idle_after=3600)
    cache.probe_interval = 0.05
    await nursery.start(cache.run)
    await wait_for(scanning.is_set)
    cache._disk_io.stuck('a test')         # another call missed its deadline meanwhile
    release.set()
    await wait_for(lambda: not cache.disk.offline and cache.disk.index_ready)


async def read_object(cache, key):
    for offset in range(0, len(OBJECT), BLOCK):
        await cache.read(key, 'etag', len(OBJECT), offset, BLOCK)


async def test_a_block_fetched_again_while_it_waits_for_the_ssd_is_counted_once(
        tmp_path, nursery, monkeypatch):
    # A reader whose SSD read found nothing (the index not ready yet, a corrupt file) fetches
    # a block while another copy of it still waits for the SSD.
    writes = threading.Event()
    write_and_measure = disk_io._write_and_measure

    def held_write(*args):
        writes.wait(10)
        return write_and_measure(*args)
    monkeypatch.setattr(disk_io, '_write_and_measure', held_write)
    monkeypatch.setattr(writeback, '_MIN_QUEUED_BLOCKS', 0)   # every queued byte is charged
    cache = cache_on(tmp_path, MemoryStore(), memory_blocks=16, idle_after=3600)
    await nursery.start(cache.run)
    await wait_for(lambda: cache.disk.index_ready)
    for key in 'abc':
        await read_object(cache, key)       # the oldest blocks wait for the SSD
    waiting = list(cache._writeback.queue)[-1]  # not in a writer's hands
    await cache._fetch(waiting, len(OBJECT), prefetch=False)
    await read_object(cache, 'd')           # the second copy leaves memory too
    writes.set()
    with trio.fail_after(10):
        await cache.flush()
    assert cache.disk_queue_bytes == 0 and cache.memory.charged == 0
