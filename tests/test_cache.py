"""The block cache: every epoch after the first is local, survives remounts, restarts and
kill -9, never serves a corrupt or outdated byte, and respects its size and policy."""

import errno
import hashlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import (BLOCK_SIZE, assert_tree_matches, block_count, drop_page_cache, is_mounted,
                      pid_alive, run_cachefs, wait_for_disk_writes, wait_until)

pytestmark = pytest.mark.fuse


def store_gets(proxy, key_suffix):
    return sum(1 for method, path, _ in proxy.requests if method == 'GET' and
               path.endswith(key_suffix))


def block_files(cache_dir):
    return sorted(Path(cache_dir).glob('*/blocks/*/*.blk'))


def test_second_full_read_sends_no_request_to_the_store(s3_source, mounter):
    mounted = mounter.mount(s3_source)
    assert_tree_matches(mounted.path, s3_source.manifest)
    wait_for_disk_writes(mounted)
    before = s3_source.request_count()
    drop_page_cache()
    assert_tree_matches(mounted.path, s3_source.manifest)
    assert s3_source.request_count() == before


@pytest.mark.parametrize('wait_for_writes', [True, False], ids=['idle-writes', 'umount-flush'])
def test_remount_serves_every_byte_from_the_ssd_with_the_store_stopped(private_oss_source,
                                                                        mounter, wait_for_writes):
    """Blocks held in memory reach the SSD once the store is idle, or at the latest at umount."""
    source = private_oss_source
    mounted = mounter.mount(source)
    assert_tree_matches(mounted.path, source.manifest)
    if wait_for_writes:
        wait_for_disk_writes(mounted)
    mounter.umount(mounted)
    source.extra['server'].stop()
    drop_page_cache()
    mounted = mounter.mount(source)
    assert_tree_matches(mounted.path, source.manifest)
    stats = mounted.stats()
    assert stats['store_requests'] == 0
    assert stats['disk_hits'] >= block_count(source.manifest)


def test_kill_9_mid_read_then_remount_reuses_the_cache(mutable_s3_source, mounter):
    source = mutable_s3_source
    mounted = mounter.mount(source, '--prefetch-window', '0')
    first = 'shard-0.bin'
    (mounted.path / first).read_bytes()
    wait_for_disk_writes(mounted)

    stop_reading = threading.Event()

    def keep_reading():
        try:
            with open(mounted.path / 'shard-2.bin', 'rb', buffering=0) as f:
                while not stop_reading.is_set() and f.read(65536):
                    pass
        except OSError:
            pass            # the daemon dies under us: ENOTCONN or EIO is the expected end
    reader = threading.Thread(target=keep_reading)
    reader.start()
    os.kill(mounted.pid, signal.SIGKILL)
    stop_reading.set()
    reader.join(timeout=30)
    assert wait_until(lambda: not pid_alive(mounted.pid))

    with pytest.raises(OSError) as raised:
        os.listdir(mounted.path)
    assert raised.value.errno == errno.ENOTCONN      # never an empty folder
    assert run_cachefs('umount', mounted.path).returncode == 0
    assert not is_mounted(mounted.path)

    mounted = mounter.mount(source, '--prefetch-window', '0')
    before = source.request_count()
    assert_tree_matches(mounted.path, source.manifest)
    # a retried request (the store may throttle under load) is one block fetched twice
    fetched = source.request_count() - before - mounted.stats()['store_retries']
    cached_blocks = (source.manifest[first][0] + BLOCK_SIZE - 1) // BLOCK_SIZE
    assert fetched <= block_count(source.manifest) - cached_blocks
    assert mounted.stats()['disk_hits'] >= cached_blocks


def cache_biggest_file(source, mounter):
    """Read the biggest file once, let its blocks reach the SSD, unmount: (mounted, name)."""
    mounted = mounter.mount(source)
    big = max(source.manifest, key=lambda p: source.manifest[p][0])
    (mounted.path / big).read_bytes()
    wait_for_disk_writes(mounted)
    mounter.umount(mounted)
    return mounted, big


def test_corrupt_block_on_disk_is_detected_and_never_served(local_source, mounter):
    mounted, big = cache_biggest_file(local_source, mounter)
    # flip one byte near the end of every block's data
    for path in block_files(mounted.cache_dir):
        with open(path, 'r+b') as f:
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    drop_page_cache()
    mounted = mounter.mount(local_source)
    data = (mounted.path / big).read_bytes()
    assert hashlib.sha256(data).hexdigest() == local_source.manifest[big][1]
    stats = mounted.stats()
    assert stats['disk_corrupt_blocks'] >= 1
    assert stats['misses'] >= 1


def test_truncated_block_file_is_detected_and_never_served(local_source, mounter):
    mounted, big = cache_biggest_file(local_source, mounter)
    for path in block_files(mounted.cache_dir):
        os.truncate(path, path.stat().st_size // 2)      # a torn write
    drop_page_cache()
    mounted = mounter.mount(local_source)
    assert hashlib.sha256((mounted.path / big).read_bytes()).hexdigest() == \
        local_source.manifest[big][1]
    assert mounted.stats()['disk_corrupt_blocks'] >= 1


def test_replaced_object_serves_only_new_bytes_after_refresh(mutable_s3_source, mounter):
    source = mutable_s3_source
    client, prefix = source.extra['client'], source.extra['prefix']
    mounted = mounter.mount(source)
    name = 'shard-1.bin'
    old = (source.local_root / name).read_bytes()
    assert (mounted.path / name).read_bytes() == old
    held = open(mounted.path / name, 'rb', buffering=0)
    try:
        head = held.read(BLOCK_SIZE)
        new = os.urandom(len(old) + 12345)
        client.put_object(Bucket='cachefs-test', Key=f'{prefix}/{name}', Body=new)
        client.delete_object(Bucket='cachefs-test', Key=f'{prefix}/labels/classes.txt')
        assert (mounted.path / name).read_bytes() == old     # still the listed version

        result = run_cachefs('refresh', mounted.path)
        assert result.returncode == 0, result.stderr
        assert (mounted.path / name).read_bytes() == new
        assert os.path.getsize(mounted.path / name) == len(new)
        assert not (mounted.path / 'labels' / 'classes.txt').exists()
        # the handle opened before keeps its version: old bytes, or EIO, never new ones
        try:
            rest = held.read()
            assert head + rest == old
        except OSError as exc:
            assert exc.errno == errno.EIO
    finally:
        held.close()
    unchanged = 'shard-0.bin'
    assert (mounted.path / unchanged).read_bytes() == (source.local_root / unchanged).read_bytes()


def test_added_object_appears_after_refresh_even_if_looked_up_before(mutable_s3_source,
                                                                      mounter):
    source = mutable_s3_source
    client, prefix = source.extra['client'], source.extra['prefix']
    mounted = mounter.mount(source)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / 'labels' / 'new.txt')     # the kernel may cache this miss
    client.put_object(Bucket='cachefs-test', Key=f'{prefix}/labels/new.txt', Body=b'bird\n')
    assert run_cachefs('refresh', mounted.path).returncode == 0
    assert (mounted.path / 'labels' / 'new.txt').read_bytes() == b'bird\n'
    assert 'new.txt' in os.listdir(mounted.path / 'labels')


def test_full_cache_under_none_policy_reads_from_the_store_and_never_evicts(s3_source,
                                                                              mounter):
    cap = 4 * BLOCK_SIZE
    mounted = mounter.mount(s3_source, '--eviction', 'none', '--cache-size', cap,
                            '--memory-cache-size', '0')
    assert_tree_matches(mounted.path, s3_source.manifest)
    stats = wait_for_disk_writes(mounted)
    assert stats['evictions'] == 0
    assert stats['disk_skipped_writes'] > 0
    assert stats['disk_used_bytes'] <= cap
    assert sum(p.stat().st_size for p in block_files(mounted.cache_dir)) <= cap
    drop_page_cache()
    before = s3_source.request_count()
    assert_tree_matches(mounted.path, s3_source.manifest)
    assert s3_source.request_count() > before          # what did not fit comes from the store
    assert mounted.stats()['evictions'] == 0
    assert mounted.stats()['disk_hits'] > 0


def test_full_cache_under_lru_policy_keeps_its_size_cap(s3_source, mounter):
    cap = 4 * BLOCK_SIZE
    mounted = mounter.mount(s3_source, '--eviction', 'lru', '--cache-size', cap,
                            '--memory-cache-size', '0')
    assert_tree_matches(mounted.path, s3_source.manifest)
    stats = wait_for_disk_writes(mounted)
    assert stats['evictions'] > 0
    assert stats['disk_used_bytes'] <= cap
    assert sum(p.stat().st_size for p in block_files(mounted.cache_dir)) <= cap


@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a tmpfs needs root')
def test_full_cache_disk_degrades_to_store_reads(s3_source, mounter, tmp_path):
    small_disk = tmp_path / 'small-disk'
    small_disk.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(small_disk)],
                   check=True)
    try:
        mounted = mounter.mount(s3_source, '--cache-size', '1G', '--free-space-ratio', '0',
                                '--memory-cache-size', '0', cache_dir=small_disk)
        assert_tree_matches(mounted.path, s3_source.manifest)
        stats = wait_for_disk_writes(mounted)
        assert stats['disk_write_errors'] > 0 or stats['disk_skipped_writes'] > 0
        assert pid_alive(mounted.pid)
        warnings = [line for line in mounted.log_file.read_text().splitlines()
                    if 'WARNING' in line and 'cache disk' in line]
        assert len(warnings) == 1, warnings
        assert not list(small_disk.glob('*/blocks/*/*.tmp*'))   # nothing half-written left
        mounter.umount(mounted)
    finally:
        subprocess.run(['umount', '-l', str(small_disk)], check=False)


def test_32_concurrent_readers_cause_one_store_request_per_block(s3_source, s3_proxy, mounter):
    big = max(s3_source.manifest, key=lambda p: s3_source.manifest[p][0])
    size, digest = s3_source.manifest[big]
    mounted = mounter.mount(s3_source)
    before = store_gets(s3_proxy, '/' + big)
    results = []

    def read_whole():
        with open(mounted.path / big, 'rb') as f:
            results.append(hashlib.sha256(f.read()).hexdigest())
    readers = [threading.Thread(target=read_whole) for _ in range(32)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert results == [digest] * 32
    assert store_gets(s3_proxy, '/' + big) - before == (size + BLOCK_SIZE - 1) // BLOCK_SIZE


def test_cache_files_are_private(local_source, mounter):
    mounted = mounter.mount(local_source)
    (mounted.path / max(local_source.manifest,
                        key=lambda p: local_source.manifest[p][0])).read_bytes()
    wait_for_disk_writes(mounted)
    files = block_files(mounted.cache_dir)
    assert files
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700


def test_prefetched_blocks_stay_in_the_memory_tier_once_read(mutable_s3_source, mounter):
    """With the SSD tier off and a prefetch budget far smaller than the file, a second read of a
    sequentially read file still sends no request: blocks that came by prefetch and were read
    move to the memory tier when newer prefetches need their room, rather than vanish."""
    source = mutable_s3_source
    data = os.urandom(24 * BLOCK_SIZE + 123)
    source.extra['client'].put_object(Bucket='cachefs-test', Key=f'{source.extra["prefix"]}/long',
                                      Body=data)
    mounted = mounter.mount(source, '--cache-size', '0', '--memory-cache-size', '64M',
                            '--prefetch-memory', str(2 * BLOCK_SIZE),
                            '--prefetch-window', str(4 * BLOCK_SIZE))
    assert (mounted.path / 'long').read_bytes() == data
    assert mounted.stats()['prefetched_bytes'] > 4 * BLOCK_SIZE
    before = source.request_count()
    drop_page_cache()
    assert (mounted.path / 'long').read_bytes() == data
    assert source.request_count() == before
