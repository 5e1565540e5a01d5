"""The mount stays correct and answers in bounded time when its surroundings fail: the store
failing at mount time or going down mid-epoch, the daemon killed, objects deleted, the cache
disk turning read-only, and a load of 64 readers with a metadata storm.

Stores are reached through `support.faults.FaultProxy` instances of this module's own, in front
of the loopback SeaweedFS. What is already covered elsewhere is not repeated here: a refused
connection at mount (test_errors), a full cache disk and the basic kill -9 remount
(test_cache).
"""

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cachefs.cache.blocks import FAILURE_MEMORY_SECONDS

from cachefs import errors
from cachefs.cache.disk import SUFFIX
from cachefs.demo.seaweed import upload_tree
from conftest import (BLOCK_SIZE, Source, clean_env, drop_page_cache, is_mounted, pid_alive,
                      run_cachefs, small_dataset, wait_for_disk_writes, wait_until, write_tree)
from support.faults import (FAULT_OPTIONS, READ_BOUND, REQUEST_TIMEOUT, RETRY_TIMEOUT, Always,
                            ByName, FaultProxy, call_within)

pytestmark = pytest.mark.fuse

BUCKET = 'cachefs-reliability'
MiB = 1 << 20


def s3_env(seaweed):
    return clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key,
                     AWS_SECRET_ACCESS_KEY=seaweed.secret_key, AWS_DEFAULT_REGION='us-east-1')


@pytest.fixture
def dataset(seaweed, tmp_path):
    """The small dataset (3 shards of 2.5-4.5 blocks and a label file) under a prefix of this
    test's own."""
    prefix = f'rel-{uuid.uuid4().hex[:8]}'
    root = tmp_path / 'src'
    manifest = write_tree(root, small_dataset(seed=prefix))
    seaweed.create_bucket(BUCKET)
    upload_tree(seaweed.client(), BUCKET, prefix + '/', root)
    return prefix, root, manifest


@pytest.fixture
def proxy(seaweed):
    with FaultProxy('127.0.0.1', seaweed.s3_port, stall_seconds=60) as proxy:
        yield proxy


def source_of(dataset, proxy, seaweed):
    prefix, root, manifest = dataset
    return Source('s3', f's3://{BUCKET}/{prefix}', ['--endpoint-url', proxy.endpoint],
                  s3_env(seaweed), manifest, root, extra={'prefix': prefix})


def bounded_read(path, bound=READ_BOUND):
    """Read a whole file within `bound` seconds: (bytes or None, errno or None)."""
    outcome = call_within(bound, lambda: Path(path).read_bytes())
    assert not outcome.hung, f'reading {path} hung for {bound:g}s'
    if outcome.error is not None:
        assert isinstance(outcome.error, OSError), outcome.error
        return None, outcome.error.errno
    return outcome.result, None


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


# -- the store at mount time and mid-epoch --

@pytest.mark.parametrize('kind', ['slowdown_503', 'stall_headers'])
def test_store_failing_at_mount_time_exits_5_within_the_retry_time_and_mounts_nothing(
        kind, dataset, proxy, seaweed, tmp_path):
    source = source_of(dataset, proxy, seaweed)
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    proxy.plan = Always(kind)
    proxy.every_request = True
    started = time.monotonic()
    result = run_cachefs('mount', source.url, mountpoint, *source.args, '--cache-dir',
                         tmp_path / 'cache', *FAULT_OPTIONS, env=source.env, timeout=60)
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_STORE, result.stderr
    assert len(lines) == 1 and lines[0].startswith('cachefs: error: cannot reach'), lines
    assert 'Traceback' not in result.stderr
    assert not is_mounted(mountpoint)
    assert os.listdir(mountpoint) == []
    # a few seconds of interpreter start-up on top of the retry time
    assert elapsed < RETRY_TIMEOUT + REQUEST_TIMEOUT + 8, elapsed
    print(f'\n{kind} at mount: exit 5 after {elapsed:.1f}s: {lines[0]}')


def test_store_down_mid_epoch_fails_uncached_reads_with_eio_and_serves_cached_ones(
        dataset, proxy, seaweed, mounter):
    source = source_of(dataset, proxy, seaweed)
    # no memory tier: what is served while the store is down comes from the SSD
    mounted = mounter.mount(source, *FAULT_OPTIONS, '--memory-cache-size', '0')
    cached, uncached = 'shard-0.bin', 'shard-1.bin'
    expected = {name: (source.local_root / name).read_bytes() for name in (cached, uncached)}
    assert (mounted.path / cached).read_bytes() == expected[cached]
    wait_for_disk_writes(mounted)

    proxy.refuse()
    drop_page_cache()
    started = time.monotonic()
    data, error = bounded_read(mounted.path / uncached)
    assert error == errno.EIO and data is None
    print(f'\nuncached read with the store down: EIO after {time.monotonic() - started:.1f}s')
    assert bounded_read(mounted.path / cached) == (expected[cached], None)
    assert sorted(os.listdir(mounted.path)) == sorted(
        {p.split('/')[0] for p in source.manifest})            # metadata needs no store
    assert os.stat(mounted.path / uncached).st_size == len(expected[uncached])
    stats = mounted.stats()
    assert stats['disk_hits'] > 0 and stats['store_errors'] > 0
    assert pid_alive(mounted.pid)

    proxy.resume()
    time.sleep(FAILURE_MEMORY_SECONDS + 0.2)    # the last failure is remembered that long
    assert bounded_read(mounted.path / uncached) == (expected[uncached], None)


def test_store_down_at_remount_uses_the_saved_listing_and_the_cached_blocks(
        dataset, proxy, seaweed, mounter):
    source = source_of(dataset, proxy, seaweed)
    mounted = mounter.mount(source, *FAULT_OPTIONS)
    cached = 'shard-0.bin'
    expected = (source.local_root / cached).read_bytes()
    assert (mounted.path / cached).read_bytes() == expected
    wait_for_disk_writes(mounted)
    mounter.umount(mounted)

    proxy.refuse()
    # --metadata-ttl 0: the mount must try the store, find it down, and fall back
    mounted = mounter.mount(source, '--retry-timeout', '1s', '--request-timeout', '1s',
                            '--metadata-ttl', '0')
    assert 'using the saved listing' in mounted.log_file.read_text()
    assert bounded_read(mounted.path / cached) == (expected, None)
    assert bounded_read(mounted.path / 'shard-2.bin') == (None, errno.EIO)


# -- the daemon killed --

def test_kill_9_mid_epoch_ends_blocked_reads_and_the_dead_mount_says_enotconn_until_umount(
        dataset, proxy, seaweed, mounter):
    source = source_of(dataset, proxy, seaweed)
    mounted = mounter.mount(source)
    cached = 'shard-0.bin'
    expected = (source.local_root / cached).read_bytes()
    assert (mounted.path / cached).read_bytes() == expected
    wait_for_disk_writes(mounted)
    blocks = next(mounted.cache_dir.glob('*/blocks'))

    # four readers stuck in the daemon: the store holds back its answers
    proxy.plan = ByName({'shard-2.bin': Always('stall_headers')})
    outcomes = []

    def stuck_reader():
        try:
            with open(mounted.path / 'shard-2.bin', 'rb') as f:
                f.read()
            outcomes.append(None)
        except OSError as exc:
            outcomes.append(exc.errno)
    readers = [threading.Thread(target=stuck_reader, daemon=True) for _ in range(4)]
    for reader in readers:
        reader.start()
    assert wait_until(lambda: proxy.injected['stall_headers'] >= 1)
    os.kill(mounted.pid, 9)
    started = time.monotonic()
    for reader in readers:
        reader.join(timeout=10)
    assert not any(reader.is_alive() for reader in readers), 'a read hung after kill -9'
    assert set(outcomes) <= {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}, outcomes
    print(f'\nblocked readers ended {time.monotonic() - started:.2f}s after kill -9: '
          f'{[errno.errorcode.get(e, e) for e in outcomes]}')
    assert wait_until(lambda: not pid_alive(mounted.pid))
    proxy.heal()

    # the dead mount says so to everything that needs the daemon, and is never an empty
    # folder (a stat the kernel can answer from its attribute cache still succeeds)
    path = mounted.path
    for access in (os.listdir, lambda p: open(p / cached, 'rb'),
                   lambda p: os.stat(p / 'never-looked-up'), os.statvfs):
        assert errno_of(access, path) == errno.ENOTCONN, access
    again = run_cachefs('mount', source.url, path, *source.args, '--cache-dir',
                        mounted.cache_dir, env=source.env)
    assert again.returncode == errors.EXIT_MOUNTPOINT, again.stderr
    stats = run_cachefs('stats', path)
    assert stats.returncode == errors.EXIT_NOT_MOUNTED, stats.stderr
    assert len(stats.stderr.strip().splitlines()) == 1

    # what a kill during an SSD write leaves behind: a temporary block file
    leftover = blocks / 'ab' / f'{"ab" * 16}{SUFFIX}.tmp12345-1'
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b'half a block')
    assert run_cachefs('umount', path).returncode == 0
    assert not is_mounted(path) and os.listdir(path) == []

    mounted = mounter.mount(source)
    before = proxy.count('GET')
    assert (mounted.path / cached).read_bytes() == expected
    assert proxy.count('GET') == before             # the cache outlived the crash
    wait_for_disk_writes(mounted)
    assert not leftover.exists()


def test_mounting_over_a_dead_mount_says_to_run_cachefs_umount(local_source, mounter):
    mounted = mounter.mount(local_source)
    os.stat(mounted.path)               # the kernel now holds the root's attributes
    os.kill(mounted.pid, 9)
    assert wait_until(lambda: not pid_alive(mounted.pid))
    again = run_cachefs('mount', local_source.url, mounted.path, '--cache-dir',
                        mounted.cache_dir)
    assert again.returncode == errors.EXIT_MOUNTPOINT, again.stderr
    assert f'cachefs umount {mounted.path}' in again.stderr, again.stderr


# -- objects deleted in the store --

def test_deleted_object_is_enoent_after_refresh_never_stale_bytes(dataset, proxy, seaweed,
                                                                  mounter):
    source = source_of(dataset, proxy, seaweed)
    prefix = source.extra['prefix']
    client = seaweed.client()
    mounted = mounter.mount(source)
    cached, opened = 'shard-0.bin', 'shard-1.bin'
    assert (mounted.path / cached).read_bytes() == (source.local_root / cached).read_bytes()
    wait_for_disk_writes(mounted)
    held = open(mounted.path / opened, 'rb', buffering=0)
    try:
        head = held.read(BLOCK_SIZE)
        assert head == (source.local_root / opened).read_bytes()[:BLOCK_SIZE]
        for name in (cached, opened, 'labels/classes.txt'):
            client.delete_object(Bucket=BUCKET, Key=f'{prefix}/{name}')
        result = run_cachefs('refresh', mounted.path)
        assert result.returncode == 0, result.stderr

        for name in (cached, opened, 'labels/classes.txt'):
            assert errno_of(os.stat, mounted.path / name) == errno.ENOENT, name
            assert errno_of(open, mounted.path / name, 'rb') == errno.ENOENT, name
        assert cached not in os.listdir(mounted.path)
        assert not (mounted.path / 'labels').exists()      # its only file is gone
        # a handle opened before keeps its version: the rest of it is not in the store any
        # more, so the read fails; it never returns other bytes
        drop_page_cache()
        outcome = call_within(READ_BOUND, held.read)
        assert not outcome.hung
        if outcome.error is None:       # from blocks read (prefetched) before the deletion
            assert head + outcome.result == (source.local_root / opened).read_bytes()
        else:
            assert outcome.error.errno in (errno.EIO, errno.ENOENT), outcome.error
    finally:
        held.close()
    assert (mounted.path / 'shard-2.bin').read_bytes() == \
        (source.local_root / 'shard-2.bin').read_bytes()


# -- the cache disk turns read-only --

def remount(folder, mode):
    for _ in range(50):             # EBUSY while a block file is being written
        if subprocess.run(['mount', '-o', f'remount,{mode}', str(folder)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f'cannot remount {folder} {mode}')


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB ext4 file system on a loop device: a cache disk that can turn read-only, as an
    SSD does on errors (errors=remount-ro)."""
    if os.geteuid() != 0:
        pytest.skip('mounting a loop device needs root')
    image = tmp_path / 'disk.img'
    folder = tmp_path / 'cache-disk'
    folder.mkdir()
    with open(image, 'wb') as f:
        f.truncate(64 * MiB)
    made = subprocess.run(['mkfs.ext4', '-q', '-F', str(image)], capture_output=True)
    if made.returncode != 0 or subprocess.run(['mount', '-o', 'loop', str(image), str(folder)],
                                              capture_output=True).returncode != 0:
        pytest.skip('no mkfs.ext4 or no loop device')
    os.chmod(folder, 0o700)
    try:
        yield folder
    finally:
        subprocess.run(['umount', '-l', str(folder)], check=False)


def test_cache_disk_turning_read_only_degrades_to_store_reads_with_one_warning(
        dataset, proxy, seaweed, mounter, small_disk):
    source = source_of(dataset, proxy, seaweed)
    # no memory tier and no prefetch buffer: every read goes to the SSD or the store
    options = ('--memory-cache-size', '0', '--prefetch-window', '0', '--free-space-ratio', '0')
    mounted = mounter.mount(source, *options, cache_dir=small_disk)
    first = 'shard-0.bin'
    expected = {name: (source.local_root / name).read_bytes() for name in source.manifest}
    assert (mounted.path / first).read_bytes() == expected[first]
    wait_for_disk_writes(mounted)

    remount(small_disk, 'ro')
    drop_page_cache()
    for name in source.manifest:
        assert bounded_read(mounted.path / name) == (expected[name], None), name
    stats = wait_for_disk_writes(mounted)
    assert stats['disk_write_errors'] > 0 or stats['disk_skipped_writes'] > 0
    assert stats['disk_hits'] > 0                       # what was cached is still served
    assert pid_alive(mounted.pid)
    warnings = [line for line in mounted.log_file.read_text().splitlines()
                if ' WARNING ' in line]
    assert len(warnings) == 1 and 'cache disk' in warnings[0], warnings
    mounter.umount(mounted)

    # nothing half-written, nothing corrupt: a remount (disk writable again) verifies it all
    remount(small_disk, 'rw')
    assert not [p for p in small_disk.rglob('*') if '.tmp' in p.name]
    drop_page_cache()
    mounted = mounter.mount(source, *options, cache_dir=small_disk, name='again')
    for name in source.manifest:
        assert (mounted.path / name).read_bytes() == expected[name]
    stats = mounted.stats()
    assert stats['disk_corrupt_blocks'] == 0 and stats['disk_hits'] > 0


def test_read_only_cache_disk_at_mount_time_is_a_clear_error(dataset, proxy, seaweed, mounter,
                                                             small_disk):
    source = source_of(dataset, proxy, seaweed)
    mountpoint = mounter.mountpoint()
    remount(small_disk, 'ro')
    result = run_cachefs('mount', source.url, mountpoint, *source.args, '--cache-dir',
                         small_disk, env=source.env)
    assert result.returncode == errors.EXIT_CACHE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Read-only file system' in lines[0], lines
    assert not is_mounted(mountpoint)


def test_ssd_tier_on_a_tmpfs_serves_its_blocks(dataset, proxy, seaweed, mounter, tmp_path):
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    disk = tmp_path / 'tmpfs'
    disk.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', str(disk)], check=True)
    try:
        source = source_of(dataset, proxy, seaweed)
        options = ('--memory-cache-size', '0', '--prefetch-window', '0')
        mounted = mounter.mount(source, *options, cache_dir=disk)
        expected = (source.local_root / 'shard-0.bin').read_bytes()
        assert (mounted.path / 'shard-0.bin').read_bytes() == expected
        wait_for_disk_writes(mounted)
        drop_page_cache()
        before = proxy.count('GET')
        assert (mounted.path / 'shard-0.bin').read_bytes() == expected
        assert proxy.count('GET') == before
        assert ' WARNING ' not in mounted.log_file.read_text()
        mounter.umount(mounted)
    finally:
        subprocess.run(['umount', '-l', str(disk)], check=False)


# -- load --

def vm_hwm_bytes(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise AssertionError('no VmHWM')


LOAD_MEMORY_CACHE = 64 * MiB
LOAD_PREFETCH_MEMORY = 32 * MiB
# What the daemon holds besides its two caches: measured 57 MiB idle (interpreter, boto3,
# pyfuse3, the listing), plus the buffers of the requests in flight, which grow with
# concurrency: 32 store requests x 1 MiB block x 2 copies (SDK read, block) and 64 FUSE reads
# of up to 1 MiB. Measured peak at 64 readers: ~250 MiB in all.
LOAD_BASE_ALLOWANCE = 200 * MiB
LOAD_READERS = int(os.environ.get('CACHEFS_LOAD_READERS', 64))
LOAD_SECONDS = float(os.environ.get('CACHEFS_LOAD_SECONDS', 8))
STORM_STATS = int(os.environ.get('CACHEFS_LOAD_STATS', 100_000))
# The kernel asks the daemon again about a name or attributes after this long: 1s keeps a steady
# stream of lookups and getattrs going to the daemon during the storm (with 0 every stat goes to
# it, about 1,400 stats/s on the 2-core development machine: too slow for CI).
LOAD_TIMEOUTS = os.environ.get('CACHEFS_LOAD_TIMEOUTS', '2h')

# The storm runs in a process of its own, so that it does not compete with 64 reader threads
# for this interpreter's GIL.
STORM_SCRIPT = """
import json, os, sys, threading, time
paths, missing, total = json.load(sys.stdin)
counts, problems, slowest = [0] * 4, [], [0.0]
def storm(part):
    for i in range(part, total, 4):
        target = missing[i % len(missing)] if i % 100 == 0 else paths[i % len(paths)]
        started = time.monotonic()
        try:
            os.stat(target)
            if target in missing:
                problems.append(target + ' exists')
        except FileNotFoundError:
            if target not in missing:
                problems.append(target + ': ENOENT')
        except OSError as exc:
            problems.append(target + ': ' + repr(exc))
        slowest[0] = max(slowest[0], time.monotonic() - started)
        counts[part] += 1
threads = [threading.Thread(target=storm, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({'stats': sum(counts), 'problems': problems[:5], 'slowest': slowest[0]}))
"""


@pytest.mark.timeout(300)
def test_64_readers_and_a_metadata_storm_get_no_error_no_hang_and_stay_in_memory_budget(
        seaweed, edge_tree, mounter, tmp_path):
    edge_root, edge_manifest = edge_tree
    prefix = f'load-{uuid.uuid4().hex[:8]}'
    rng = random.Random(prefix)
    # 4 x 40 MiB: more than the memory budget, so that an unbounded cache would show
    big = {f'big/{i}.bin': rng.randbytes(40 * MiB + i * 12345) for i in range(4)}
    root = tmp_path / 'src'
    write_tree(root, big)
    seaweed.create_bucket(BUCKET)
    client = seaweed.client()
    upload_tree(client, BUCKET, prefix + '/', root)
    upload_tree(client, BUCKET, prefix + '/edge/', edge_root)
    source = Source('s3', f's3://{BUCKET}/{prefix}', ['--endpoint-url', seaweed.endpoint],
                    s3_env(seaweed), {}, root)
    mounted = mounter.mount(source, '--memory-cache-size', LOAD_MEMORY_CACHE,
                            '--prefetch-memory', LOAD_PREFETCH_MEMORY, '--cache-size', '0',
                            '--entry-timeout', LOAD_TIMEOUTS, '--attr-timeout', LOAD_TIMEOUTS)
    idle_hwm = vm_hwm_bytes(mounted.pid)

    stop = threading.Event()
    problems = []
    reads = [0] * LOAD_READERS
    verified = [0] * LOAD_READERS
    slowest = [0.0]

    def reader(i):
        name = sorted(big)[i % len(big)]
        data = big[name]
        local = random.Random(i)
        try:
            with open(mounted.path / name, 'rb', buffering=0) as f:
                while not stop.is_set():
                    offset = local.randrange(0, len(data))
                    size = local.choice((65536, 256 << 10, 1 << 20))
                    started = time.monotonic()
                    got = os.pread(f.fileno(), size, offset)
                    slowest[0] = max(slowest[0], time.monotonic() - started)
                    if got != data[offset:offset + size]:
                        problems.append(f'reader {i}: wrong bytes at {offset}')
                        return
                    reads[i] += 1
                    verified[i] += len(got)
                    stop.wait(0.01)         # a data loader decodes what it read
        except OSError as exc:
            problems.append(f'reader {i}: {exc!r}')

    def dropper():      # keep the page cache from answering for the daemon
        while not stop.wait(1.0):
            drop_page_cache()

    paths = [str(mounted.path / 'edge' / p) for p in edge_manifest]
    paths += sorted({os.path.dirname(p) for p in paths})
    missing = [str(mounted.path / 'edge' / f'no-such-{i}') for i in range(16)]

    threads = [threading.Thread(target=reader, args=(i,), daemon=True, name=f'reader-{i}')
               for i in range(LOAD_READERS)]
    threads.append(threading.Thread(target=dropper, daemon=True, name='dropper'))
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        storm = subprocess.run([sys.executable, '-c', STORM_SCRIPT], capture_output=True,
                               text=True, input=json.dumps([paths, missing, STORM_STATS]),
                               timeout=LOAD_SECONDS + 120)
        storm_seconds = time.monotonic() - started
        time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=READ_BOUND + 20)
    hung = [t.name for t in threads if t.is_alive()]
    elapsed = time.monotonic() - started
    peak = vm_hwm_bytes(mounted.pid)
    budget = LOAD_MEMORY_CACHE + LOAD_PREFETCH_MEMORY + LOAD_BASE_ALLOWANCE
    stats = mounted.stats()
    assert storm.returncode == 0, storm.stderr
    storm_result = json.loads(storm.stdout)
    figures = {
        'readers': LOAD_READERS, 'reads': sum(reads), 'bytes_verified': sum(verified),
        'slowest_read_s': round(slowest[0], 2), 'stats': storm_result['stats'],
        'slowest_stat_s': round(storm_result['slowest'], 2),
        'storm_seconds': round(storm_seconds, 1), 'seconds': round(elapsed, 1),
        'kernel_timeouts': LOAD_TIMEOUTS, 'idle_vm_hwm_mib': round(idle_hwm / MiB, 1),
        'peak_vm_hwm_mib': round(peak / MiB, 1), 'budget_mib': round(budget / MiB, 1),
        'store_bytes': stats['store_bytes'], 'fuse_ops': {
            op: v['count'] for op, v in stats.get('fuse_ops', {}).items()},
        'problems': (problems + storm_result['problems'])[:5], 'hung_threads': hung,
    }
    (tmp_path / 'load.json').write_text(json.dumps(figures, indent=2))
    print(f'\nload figures ({tmp_path / "load.json"}): {json.dumps(figures)}')
    assert problems == [] and storm_result['problems'] == []
    assert hung == []
    assert storm_result['stats'] == STORM_STATS
    assert all(reads), 'every reader made progress'
    assert pid_alive(mounted.pid)
    assert peak < budget, figures
