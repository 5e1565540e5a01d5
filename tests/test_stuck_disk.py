"""A cache disk that stops answering, or that is much slower than the store: reads go on from
memory and the store in bounded time, the SSD tier goes offline with one warning, unmount does
not wait for the disk, the blocks waiting for the SSD stay within the memory budget, and an
offline tier comes back once its probe answers.

The cache folder is on `support.pausable_fs`, a passthrough FUSE file system whose requests the
test can hold (pause) or slow down (throttle writes), run as a process of its own.
"""

import hashlib
import os
import random
import time

import pytest
import trio

from cachefs.cache import disk_io
from cachefs.cache.blocks import BlockCache
from cachefs.cache.disk import DiskTier
from conftest import (Source, assert_tree_matches, clean_env, drop_page_cache, is_mounted,
                      pid_alive, run_cachefs, wait_for_disk_writes, wait_until, write_tree)
from support.faults import call_within
from support.pausable_fs import PausableFs
from test_block_cache import BLOCK, BLOCKS, OBJECT, MemoryStore, read_all, wait_for
from test_reliability import LOAD_BASE_ALLOWANCE, vm_hwm_bytes

pytestmark = pytest.mark.fuse

MiB = 1 << 20


@pytest.fixture
def pausable_disk(tmp_path):
    """A cache disk the test can pause or throttle; always resumed, unmounted and stopped."""
    disk = PausableFs(tmp_path / 'disk-backing', tmp_path / 'disk', tmp_path / 'disk.control')
    disk.start()
    try:
        yield disk
    finally:
        disk.stop()


def local_source(root, manifest):
    return Source('local', str(root), [], clean_env(), manifest, root)


def warnings_in(mounted):
    return [line for line in mounted.log_file.read_text().splitlines() if ' WARNING ' in line]


def test_a_cache_disk_that_stops_answering_goes_offline_once_and_reads_go_on_from_the_store(
        tmp_path, pausable_disk, mounter):
    rng = random.Random('stuck')
    files = {f'shard-{i:02}.bin': rng.randbytes(int(MiB * (1.5 + i % 3) + i)) for i in range(12)}
    root = tmp_path / 'src'
    manifest = write_tree(root, files)
    # A small memory tier, so that the second read of a file goes to the SSD.
    mounted = mounter.mount(local_source(root, manifest), '--memory-cache-size', '2M',
                            cache_dir=pausable_disk.mountpoint)
    try:
        cached = {name: manifest[name] for name in sorted(manifest)[:6]}
        assert_tree_matches(mounted.path, cached, threads=1)
        assert wait_for_disk_writes(mounted)['disk_writes'] > 0
        drop_page_cache()

        pausable_disk.pause()
        outcome = call_within(60, assert_tree_matches, mounted.path, manifest)
        assert not outcome.hung, 'reads hung on the paused cache disk'
        assert outcome.error is None, outcome.error
        assert pausable_disk.blocked() > 0          # the disk did hold the daemon's requests
        stats = mounted.stats()
        assert stats['disk_offline'] and stats['disk_writes_pending'] == 0
        print(f'\nevery file read byte-exact in {outcome.elapsed:.1f}s with the cache disk '
              f'paused; {pausable_disk.blocked()} requests held there')
        # Offline, the disk is not asked again: a second pass makes no new request there.
        held = pausable_disk.blocked()
        drop_page_cache()
        again = call_within(30, assert_tree_matches, mounted.path, manifest)
        assert not again.hung and again.error is None, again.error
        assert pausable_disk.blocked() == held
        warnings = warnings_in(mounted)
        assert len(warnings) == 1 and 'SSD tier offline' in warnings[0], warnings

        # Unmount while the disk is still paused: nothing is written, nothing waited for.
        started = time.monotonic()
        result = run_cachefs('umount', mounted.path, '--timeout', '10')
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mounted.path)
        assert elapsed < 10, elapsed
        print(f'umount with the cache disk paused took {elapsed:.1f}s')
    finally:
        pausable_disk.resume()
    # Its threads stuck on the disk let the daemon go once the disk answers.
    assert wait_until(lambda: not pid_alive(mounted.pid), timeout=15)


def write_random_tree(root, count, size, seed):
    """`count` files of `size` random bytes, written and hashed piece by piece (not held in
    memory). Returns the manifest."""
    rng = random.Random(seed)
    manifest = {}
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        name = f'big-{i}.bin'
        digest = hashlib.sha256()
        with open(os.path.join(root, name), 'wb') as f:
            for _ in range(size // (4 * MiB)):
                piece = rng.randbytes(4 * MiB)
                digest.update(piece)
                f.write(piece)
        manifest[name] = (size, digest.hexdigest())
    return manifest


SLOW_DISK_MEMORY = 8 * MiB
SLOW_DISK_PREFETCH = 8 * MiB


def test_a_cache_disk_slower_than_the_store_keeps_the_daemon_in_its_memory_budget(
        tmp_path, pausable_disk, mounter):
    # 240 MiB: more than the old 64-block SSD write queue (256 MiB of 4 MiB blocks) needs to
    # show past the budget, read in 4 MiB blocks as in production.
    root = tmp_path / 'src'
    manifest = write_random_tree(root, 6, 40 * MiB, seed='slow-disk')
    pausable_disk.throttle(4_000_000)           # 4 MB/s of writes
    mounted = mounter.mount(local_source(root, manifest), '--block-size', '4M',
                            '--memory-cache-size', str(SLOW_DISK_MEMORY),
                            '--prefetch-memory', str(SLOW_DISK_PREFETCH),
                            cache_dir=pausable_disk.mountpoint)
    try:
        outcome = call_within(120, assert_tree_matches, mounted.path, manifest, 4)
        assert not outcome.hung, 'reads waited for the slow cache disk'
        assert outcome.error is None, outcome.error
        peak = vm_hwm_bytes(mounted.pid)
        # the disk goes on writing what it could take, a block a second
        assert wait_until(lambda: mounted.stats()['disk_writes'] > 0, timeout=30)
        stats = mounted.stats()
    finally:
        pausable_disk.throttle(0)
    budget = SLOW_DISK_MEMORY + SLOW_DISK_PREFETCH + LOAD_BASE_ALLOWANCE
    print(f'\nread {len(manifest)} x 40 MiB in {outcome.elapsed:.1f}s with writes at 4 MB/s: '
          f'peak VmHWM {peak / MiB:.0f} MiB (budget {budget / MiB:.0f} MiB), '
          f'{stats["disk_writes"]} blocks written, {stats["disk_skipped_writes"]} skipped')
    assert peak <= budget, (peak / MiB, budget / MiB)
    assert not stats['disk_offline']                # slow is not stuck: the tier stays online
    assert stats['disk_skipped_writes'] > 0          # what the disk could not take was dropped
    assert warnings_in(mounted) == []


async def test_an_offline_ssd_tier_comes_back_when_its_probe_answers(pausable_disk, nursery,
                                                                      monkeypatch):
    # In-process (a mount cannot shorten its deadlines): a real cache disk, an in-memory store.
    monkeypatch.setattr(disk_io, '_DISK_READ_DEADLINE', 0.5)
    store = MemoryStore()
    disk = DiskTier(str(pausable_disk.mountpoint), BLOCK, capacity=1 << 30, min_free_ratio=0,
                    eviction='lru')
    cache = BlockCache(store, BLOCK, 0, disk, idle_after=3600, probe_interval=0.5)
    await nursery.start(cache.run)
    await wait_for(lambda: disk.index_ready)
    assert await read_all(cache) == OBJECT              # no memory tier: every block to the SSD
    await wait_for(lambda: cache.disk_writes_pending == 0)
    assert disk.counters.writes == BLOCKS
    try:
        pausable_disk.pause()
        reads = store.reads
        with trio.fail_after(10):
            assert await read_all(cache) == OBJECT
        assert disk.offline and store.reads > reads     # served by the store meanwhile
    finally:
        pausable_disk.resume()
    await wait_for(lambda: not disk.offline)
    reads, hits = store.reads, cache.counters.disk_hits
    assert await read_all(cache) == OBJECT
    assert store.reads == reads and cache.counters.disk_hits == hits + BLOCKS
