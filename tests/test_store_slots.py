"""Store slots and fallbacks: a read never waits for a slot past its own deadline, an abandoned
threaded attempt gives its slot back (and the threads left behind are bounded), zero slots are
refused, and a lean S3 path that met an answer it does not handle is used again later.

The slot rules are pure logic (`AsyncStore` over a store whose calls block on an event); the
queueing and the fallback are tested against the loopback SeaweedFS through
`support.faults.FaultProxy`.
"""

import errno
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio

from cachefs.demo.seaweed import upload_tree
from cachefs.ufs.async_store import AsyncStore
from cachefs.ufs.errors import TransientError
from cachefs.ufs.s3 import S3Store
from cachefs.ufs.s3_detour import FIRST_LENGTH, MAX_LENGTH, Detour

from conftest import Source, clean_env, write_tree
from support.faults import (FAULT_OPTIONS, READ_BOUND, REQUEST_TIMEOUT, RETRY_TIMEOUT, Always,
                            ByName, FaultProxy, FirstTry, call_within)

BUCKET = 'cachefs-slots'
QUEUED_READERS = 20


class BlockingStore:
    """A threaded store: reads of 'stuck-*' keys block until `release`; others answer at once."""

    source = 'test://blocking'
    request_timeout = 0.2

    def __init__(self):
        self.released = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def read(self, key, etag, offset, length):
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if key.startswith('stuck-'):
                self.released.wait(30)
            return b'x' * length
        finally:
            with self._lock:
                self.running -= 1

    def release(self):
        self.released.set()


@pytest.mark.parametrize('slots', [0, -1])
def test_a_store_concurrency_below_one_is_refused(slots):
    with pytest.raises(ValueError, match='at least 1'):
        AsyncStore(BlockingStore(), slots)


def test_an_abandoned_threaded_attempt_gives_its_store_slot_back():
    store = BlockingStore()

    async def main():
        # a retry time shorter than the request timeout: one attempt, one thread left behind
        async_store = AsyncStore(store, max_concurrency=1, retry_timeout=0.1)
        started = time.monotonic()
        with pytest.raises(TransientError, match='request timeout'):
            await async_store.read('stuck-1', 'etag', 0, 10)
        assert time.monotonic() - started < 0.1 + 0.2 + 1.0
        # its worker thread still blocks, but the one slot is free again
        assert store.running == 1
        assert await async_store.read('fine', 'etag', 0, 10) == b'x' * 10

    try:
        trio.run(main)
    finally:
        store.release()


def test_threads_left_behind_by_abandoned_attempts_are_bounded():
    store = BlockingStore()

    async def main():
        async_store = AsyncStore(store, max_concurrency=2, retry_timeout=0.3)
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(read_and_fail, async_store, f'stuck-{i}')
        # at most 2 x the slots are alive: 2 x 2
        assert store.most_running == 4
        # while they block, a read fails in bounded time rather than starting a fifth thread
        started = time.monotonic()
        with pytest.raises(TransientError):
            await async_store.read('fine', 'etag', 0, 10)
        assert time.monotonic() - started < 0.3 + 0.2 + 1.0
        store.release()
        await trio.sleep(0.1)
        assert await async_store.read('fine', 'etag', 0, 10) == b'x' * 10

    async def read_and_fail(async_store, key):
        with pytest.raises(TransientError):
            await async_store.read(key, 'etag', 0, 10)

    try:
        trio.run(main)
    finally:
        store.release()


def test_a_lean_path_refused_again_takes_longer_detours_and_a_success_resets_them():
    detour = Detour('object reads', 'the trio path', 'worker threads')
    lengths = []
    for _ in range(12):
        detour.refused('reading k', 'HTTP 400')
        length = 0
        while detour.active():
            length += 1
        lengths.append(length)
    assert lengths[:3] == [FIRST_LENGTH, 2 * FIRST_LENGTH, 4 * FIRST_LENGTH]
    assert lengths[-1] == MAX_LENGTH
    detour.succeeded()
    detour.refused('reading k', 'HTTP 400')
    assert sum(1 for _ in iter(detour.active, False)) == FIRST_LENGTH


# -- against SeaweedFS --

@pytest.fixture(scope='module')
def slots_data(seaweed, tmp_path_factory):
    root = tmp_path_factory.mktemp('slots-src')
    rng = random.Random('cachefs-slots')
    files = {f'queued-{i:02d}.bin': rng.randbytes(50_000) for i in range(QUEUED_READERS)}
    files |= {f'plain-{i:02d}.bin': rng.randbytes(20_000) for i in range(4 * FIRST_LENGTH)}
    manifest = write_tree(root, files)
    seaweed.create_bucket(BUCKET)
    upload_tree(seaweed.client(), BUCKET, 'data/', root, threads=8)
    return root, manifest


@pytest.fixture
def fault_proxy(seaweed):
    proxy = FaultProxy('127.0.0.1', seaweed.s3_port, stall_seconds=120)
    with proxy:
        try:
            yield proxy
        finally:
            proxy.heal()


@pytest.mark.fuse
def test_a_read_queued_for_a_store_slot_fails_within_its_own_retry_time(
        seaweed, slots_data, fault_proxy, mounter):
    """One slot, 20 readers of objects that never answer: each stalled attempt holds the slot
    for the request timeout, so the last reader in the queue would wait for all the others."""
    root, manifest = slots_data
    env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                    AWS_DEFAULT_REGION='us-east-1')
    source = Source('s3', f's3://{BUCKET}/data', ['--endpoint-url', fault_proxy.endpoint], env,
                    manifest, root)
    mounted = mounter.mount(source, *FAULT_OPTIONS, '--store-concurrency', '1',
                            '--cache-size', '0')
    fault_proxy.plan = ByName({'queued-': Always('stall_headers')})

    def read(relpath):
        return call_within(READ_BOUND + 10, lambda: (mounted.path / relpath).read_bytes())

    with ThreadPoolExecutor(QUEUED_READERS) as pool:
        outcomes = list(pool.map(read, [f'queued-{i:02d}.bin' for i in range(QUEUED_READERS)]))
    slowest = max(outcome.elapsed for outcome in outcomes)
    print(f'\n{QUEUED_READERS} readers queued for one slot: the slowest failed after '
          f'{slowest:.2f}s (retry {RETRY_TIMEOUT:g}s + request {REQUEST_TIMEOUT:g}s; '
          f'bound {READ_BOUND:g}s)')
    for outcome in outcomes:
        assert not outcome.hung
        assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO, \
            outcome.error
    assert slowest <= READ_BOUND


def test_after_an_unexpected_answer_s3_reads_return_to_the_trio_path(
        seaweed, slots_data, fault_proxy, monkeypatch, caplog):
    root, manifest = slots_data
    for name, value in clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key,
                                 AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                                 AWS_DEFAULT_REGION='us-east-1').items():
        monkeypatch.setenv(name, value)
    # a request timeout for a loaded machine: a retried read would be counted twice
    store = S3Store(BUCKET, 'data/', endpoint_url=fault_proxy.endpoint, path_style=True,
                    request_timeout=10.0)
    assert store._trio_getter is not None
    objects = {o.key: o for o in store.list_objects()}
    plain = sorted(key for key in objects if key.startswith('plain-'))
    threaded = []
    read_in_thread = store.read

    def counting_read(key, *args):
        threaded.append(key)
        return read_in_thread(key, *args)
    store.read = counting_read
    # one answer of this kind, on the first read only
    fault_proxy.plan = ByName({plain[0]: FirstTry('http_400')})

    async def read_all(keys):
        async_store = AsyncStore(store, 4, 30.0)
        for key in keys:
            data = await async_store.read(key, objects[key].etag, 0, objects[key].size)
            assert bytes(data) == (root / key).read_bytes()

    caplog.set_level(logging.INFO, logger='cachefs.ufs.s3_detour')
    try:
        trio.run(read_all, plain[:FIRST_LENGTH + 1])
        # the refused read and the next ones went through worker threads
        assert list(dict.fromkeys(threaded)) == plain[:FIRST_LENGTH + 1]
        assert fault_proxy.injected['http_400'] == 1
        trio.run(read_all, plain[FIRST_LENGTH + 1:])
        # then the trio path took over again, for good
        assert list(dict.fromkeys(threaded)) == plain[:FIRST_LENGTH + 1]
        assert store._threaded_reads.taken == 1
        assert 'object reads go through the trio path again' in caplog.text
    finally:
        store.close()
