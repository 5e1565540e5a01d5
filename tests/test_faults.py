"""Under every fault a network and a store inflict on an object read, a read through cachefs
returns the source's bytes, or fails with EIO once the retry time is spent; it never returns
wrong bytes, never hangs, and the daemon stays up.

The faults come from `support.faults.FaultProxy`, a proxy of this module's own in front of the
loopback SeaweedFS (the session's counting proxy stays clean). Mounts run with
`--retry-timeout 3s --request-timeout 1s`. Every read has a wall-clock bound (`READ_BOUND`); a
read still running then counts as a hang. The long run writes its figures to `faults.json` in
its tmp folder and prints them (`pytest -s`).
"""

import errno
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachefs.cache.blocks import FAILURE_MEMORY_SECONDS
from cachefs.demo.seaweed import upload_tree

from conftest import (BLOCK_SIZE, Mounter, Source, clean_env, drop_page_cache, pid_alive,
                      wait_until, write_tree)
from support.faults import (FAULT_OPTIONS, KINDS, READ_BOUND, REQUEST_TIMEOUT, RETRY_TIMEOUT,
                            Always, ByName, FaultProxy, FirstTry, SeededMix, call_within)

pytestmark = pytest.mark.fuse

BUCKET = 'cachefs-faults'
MiB = 1 << 20
SMALL_SIZE = int(3.5 * BLOCK_SIZE)
BIG_SIZE = 64 * MiB
# what the seeded mix reads in all: 2 GiB (CACHEFS_FAULT_MIX_MIB changes it, for a longer soak)
LONG_READ_BYTES = int(os.environ.get('CACHEFS_FAULT_MIX_MIB', 2048)) * MiB
LONG_READERS = 2                   # concurrent readers, one big object each
MIX_SEED = int(os.environ.get('CACHEFS_FAULT_MIX_SEED', 20240611))
MIX_RATE = float(os.environ.get('CACHEFS_FAULT_MIX_RATE', 0.02))   # share of reads broken
# the prefetch buffer keeps fetched blocks until it needs room: keep it small, so that each pass
# reads from the store again
MIX_OPTIONS = os.environ.get('CACHEFS_FAULT_MIX_OPTIONS',
                             '--prefetch-window 4M --prefetch-memory 8M').split()


@pytest.fixture(scope='module')
def fault_data(seaweed, tmp_path_factory):
    """Per fault kind, one file broken once per block and one broken always (3.5 blocks each);
    two 64 MiB objects for the long run. Uploaded once, to a bucket of this module's own."""
    root = tmp_path_factory.mktemp('fault-src')
    rng = random.Random('cachefs-faults')
    files = {f'{mode}-{kind}.bin': rng.randbytes(SMALL_SIZE)
             for kind in KINDS for mode in ('once', 'always')}
    files |= {f'big-{i}.bin': rng.randbytes(BIG_SIZE) for i in range(LONG_READERS)}
    manifest = write_tree(root, files)
    seaweed.create_bucket(BUCKET)
    upload_tree(seaweed.client(), BUCKET, 'data/', root, threads=4)
    return root, manifest


def fault_proxy_for(seaweed):
    # A drip outlasts READ_BOUND, so that a read bounded only by per-socket timeouts shows up
    # as a hang.
    return FaultProxy('127.0.0.1', seaweed.s3_port, stall_seconds=REQUEST_TIMEOUT + 1.5,
                      drip_seconds=READ_BOUND + 4, seed=MIX_SEED)


def source_through(proxy, seaweed, fault_data):
    root, manifest = fault_data
    env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                    AWS_DEFAULT_REGION='us-east-1')
    return Source('s3', f's3://{BUCKET}/data', ['--endpoint-url', proxy.endpoint], env, manifest,
                  root)


@pytest.fixture(scope='module')
def faulty_mount(seaweed, fault_data, tmp_path_factory):
    """One mount for the one-kind-at-a-time tests: every kind breaks the reads of its own files."""
    mounter = Mounter(tmp_path_factory.mktemp('fault-mount'))
    with fault_proxy_for(seaweed) as proxy:
        try:
            mounted = mounter.mount(source_through(proxy, seaweed, fault_data), *FAULT_OPTIONS,
                                    '--cache-size', '0')
            yield proxy, mounted
        finally:
            proxy.heal()
            mounter.cleanup()


def read_file_within(path, bound):
    """Read a whole file in 1 MiB reads, each bounded by `bound` seconds.
    Returns (bytes read, the error that ended it or None, slowest read in seconds)."""
    parts = []
    slowest = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            outcome = call_within(bound, os.pread, fd, MiB, offset)
            slowest = max(slowest, outcome.elapsed)
            assert not outcome.hung, f'a read of {path} at {offset} hung for {bound:g}s'
            if outcome.error is not None:
                return b''.join(parts), outcome.error, slowest
            if not outcome.result:
                return b''.join(parts), None, slowest
            parts.append(outcome.result)
            offset += len(outcome.result)
    finally:
        os.close(fd)


def read_all_kinds(mounted, mode):
    """Read the `mode` file of every kind at once; {kind: (bytes, error, slowest)}."""
    with ThreadPoolExecutor(len(KINDS)) as pool:
        results = pool.map(lambda kind: read_file_within(mounted.path / f'{mode}-{kind}.bin',
                                                         READ_BOUND), KINDS)
        return dict(zip(KINDS, results))


def test_every_kind_of_fault_on_a_first_try_is_retried_and_every_byte_matches(faulty_mount,
                                                                                fault_data):
    proxy, mounted = faulty_mount
    root, _ = fault_data
    proxy.plan = ByName({f'once-{kind}.bin': FirstTry(kind) for kind in KINDS})
    retries_before = mounted.stats()['store_retries']
    results = read_all_kinds(mounted, 'once')
    blocks = -(-SMALL_SIZE // BLOCK_SIZE)
    for kind, (data, error, slowest) in results.items():
        print(f'\n{kind}: broken once per block, read whole in {slowest:.2f}s at most per read')
        assert error is None, (kind, error)
        assert data == (root / f'once-{kind}.bin').read_bytes(), kind
        assert proxy.injected[kind] >= blocks, (kind, proxy.injected)
    assert mounted.stats()['store_retries'] - retries_before >= blocks * len(KINDS)
    assert pid_alive(mounted.pid)


def test_every_kind_of_persistent_fault_fails_the_read_with_eio_in_bounded_time(faulty_mount,
                                                                                 fault_data):
    proxy, mounted = faulty_mount
    root, _ = fault_data
    proxy.plan = ByName({f'always-{kind}.bin': Always(kind) for kind in KINDS})
    started = time.monotonic()
    results = read_all_kinds(mounted, 'always')
    for kind, (data, error, slowest) in results.items():
        print(f'\n{kind}: broken always, EIO after {slowest:.2f}s (bound {READ_BOUND:g}s)')
        assert isinstance(error, OSError) and error.errno == errno.EIO, (kind, error)
        assert data == b'', kind
        assert slowest <= READ_BOUND
    print(f'all kinds failed within {time.monotonic() - started:.2f}s')
    assert pid_alive(mounted.pid)

    # the store recovers: a failure is remembered for a moment only (so that the kernel's
    # immediate second request for the same pages fails at once); then every byte comes back.
    # Prefetches started before the heal may still be in their retry loops (the readers gave
    # up at the first EIO): their last failure starts its own moment, so wait for them first.
    proxy.heal()
    assert wait_until(lambda: mounted.stats()['store_in_flight'] == 0,
                      timeout=RETRY_TIMEOUT + REQUEST_TIMEOUT + 5)
    time.sleep(FAILURE_MEMORY_SECONDS + 0.2)
    for kind, (data, error, _) in read_all_kinds(mounted, 'always').items():
        assert error is None, (kind, error)
        assert data == (root / f'always-{kind}.bin').read_bytes(), kind


class LongRunFigures:
    """What the long run counts; written to JSON and printed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes_verified = 0
        self.wrong_bytes = 0
        self.short_reads = 0
        self.hangs = 0
        self.eio_reads = 0
        self.eio_bytes_skipped = 0
        self.other_errors = []
        self.reads = 0
        self.slowest_read_s = 0.0
        self.slowest_failed_read_s = 0.0
        self.passes = 0

    def as_dict(self):
        return {k: v for k, v in vars(self).items() if k != 'lock'}


def read_passes(path, expected, passes, figures, seed):
    """Read `path` whole `passes` times with the page cache dropped before each, in reads of
    loader-like sizes, each bounded; count everything in `figures`. Stops at the first hang."""
    rng = random.Random(seed)
    sizes = (64 << 10, 128 << 10, 256 << 10, 1 << 20, 2 << 20)
    for _ in range(passes):
        drop_page_cache()
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < len(expected):
                size = rng.choice(sizes)
                outcome = call_within(READ_BOUND, os.pread, fd, size, offset)
                with figures.lock:
                    figures.reads += 1
                    figures.slowest_read_s = max(figures.slowest_read_s, outcome.elapsed)
                    if outcome.hung:
                        figures.hangs += 1
                        return
                    error = outcome.error
                    if error is not None:
                        if isinstance(error, OSError) and error.errno == errno.EIO:
                            figures.eio_reads += 1
                            figures.eio_bytes_skipped += min(size, len(expected) - offset)
                            figures.slowest_failed_read_s = max(figures.slowest_failed_read_s,
                                                                outcome.elapsed)
                        else:
                            figures.other_errors.append(repr(error))
                        offset += size
                        continue
                    data = outcome.result
                    want = expected[offset:offset + size]
                    if len(data) != len(want):
                        figures.short_reads += 1
                    if data != want[:len(data)]:
                        figures.wrong_bytes += sum(a != b for a, b in zip(data, want))
                    figures.bytes_verified += len(data)
                    offset += max(len(data), 1)
        finally:
            os.close(fd)
        with figures.lock:
            figures.passes += 1


@pytest.mark.timeout(600)
def test_seeded_fault_mix_over_2_gib_never_returns_a_wrong_byte_or_hangs(seaweed, fault_data,
                                                                          mounter, tmp_path):
    root, _ = fault_data
    with fault_proxy_for(seaweed) as proxy:
        proxy.plan = ByName({'big-': SeededMix(MIX_SEED, MIX_RATE, {k: 1 for k in KINDS})})
        mounted = mounter.mount(source_through(proxy, seaweed, fault_data), *FAULT_OPTIONS,
                                '--memory-cache-size', '0', '--cache-size', '0', *MIX_OPTIONS)
        figures = LongRunFigures()
        passes = -(-LONG_READ_BYTES // (BIG_SIZE * LONG_READERS))
        names = [f'big-{i}.bin' for i in range(LONG_READERS)]
        expected = {name: (root / name).read_bytes() for name in names}
        started = time.monotonic()
        readers = [threading.Thread(target=read_passes, args=(
            mounted.path / name, expected[name], passes, figures, MIX_SEED + i))
            for i, name in enumerate(names)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        elapsed = time.monotonic() - started
        proxy.heal()
        stats = mounted.stats()
        alive = pid_alive(mounted.pid)
        injected = dict(proxy.injected)

    result = figures.as_dict() | {
        'seconds': round(elapsed, 1),
        'mib_per_s': round(figures.bytes_verified / MiB / elapsed, 1),
        'read_bound_s': READ_BOUND,
        'retry_timeout_s': RETRY_TIMEOUT,
        'request_timeout_s': REQUEST_TIMEOUT,
        'fault_rate': MIX_RATE,
        'faults_injected': sum(injected.values()),
        'faults_by_kind': injected,
        'object_reads_through_proxy': proxy.count('GET'),
        'store_requests': stats['store_requests'],
        'store_retries': stats['store_retries'],
        'store_errors': stats['store_errors'],
        'daemon_alive': alive,
    }
    report = tmp_path / 'faults.json'
    report.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f'\nfault mix figures ({report}):\n{json.dumps(result, indent=2, sort_keys=True)}')

    assert figures.hangs == 0
    assert figures.wrong_bytes == 0
    assert figures.short_reads == 0
    assert figures.other_errors == []
    assert figures.passes == passes * LONG_READERS
    assert figures.bytes_verified + figures.eio_bytes_skipped >= LONG_READ_BYTES
    assert figures.slowest_failed_read_s <= READ_BOUND
    assert alive
    assert set(injected) == set(KINDS), injected
    assert stats['store_errors'] >= sum(injected.values())     # no fault went unnoticed
