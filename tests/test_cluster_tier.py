"""The cluster tier against a real memcached on loopback (started per module on a free port,
stopped by PID): hits, misses and fills; forged and foreign blocks refused with the store's bytes
served; dead, hanging, returning and restarted peers; the fill queue; items too large for a peer.

The store under the tier is an in-memory stand-in that counts its reads (the tier's contract is
cache/fetches.py's BlockStore); mounts with --cluster against real stores are in the rig's tests.
"""

import hashlib
import logging
import os
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from cachefs.cache.cluster import ClusterTier, read_secret
from cachefs.cache.cluster_protocol import WON, MetaConnection, Sealer, cluster_key
from cachefs.errors import UserError
from conftest import assert_tree_matches, free_port, run_cachefs, wait_until

BLOCK = 1 << 20
MEMCACHED = '/usr/bin/memcached'
pytestmark = pytest.mark.skipif(not os.path.exists(MEMCACHED), reason='memcached not installed')


class Memcached:
    """One memcached on 127.0.0.1:`port`, started and stopped by this test process."""

    def __init__(self, port=None, item_size='8m', memory='64', extra=(), user='nobody'):
        self.port = port or free_port()
        self.user = user
        self.item_size = item_size
        self.memory = memory
        self.extra = list(extra)
        self.process = None

    def start(self):
        user = ['-u', self.user] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [MEMCACHED, *user, '-l', '127.0.0.1', '-p', str(self.port), '-U', '0',
             '-m', self.memory, '-I', self.item_size, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f'memcached did not start on port {self.port}')

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    @property
    def url(self):
        return f'memcached://127.0.0.1:{self.port}'


@pytest.fixture(scope='module')
def memcached():
    server = Memcached().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_memcached():
    server = Memcached()
    try:
        yield server
    finally:
        server.stop()


def block_bytes(key, offset, length):
    seed = hashlib.sha256(f'{key}@{offset}'.encode()).digest()
    return (seed * (length // 32 + 1))[:length]


class MemoryStore:
    """The store under the tier: deterministic bytes per (key, offset), reads counted."""

    def __init__(self):
        self.reads = []

    async def read(self, key, etag, offset, length):
        self.reads.append((key, offset))
        await trio.lowlevel.checkpoint()
        return block_bytes(key, offset, length)


def sha(data):
    return hashlib.sha256(bytes(data)).hexdigest()


NAMESPACE = ClusterTier.namespace_of('s3://bucket/test|')
_unique = iter(range(10 ** 6))


def new_key():
    """A key no other test used: the module's memcached is shared."""
    return f'train/shard-{os.getpid()}-{next(_unique):05d}'


def make_tier(url, store=None, **kwargs):
    kwargs.setdefault('connect_timeout', 0.2)
    kwargs.setdefault('read_timeout', 0.5)
    return ClusterTier(store or MemoryStore(), url, NAMESPACE, BLOCK, **kwargs)


@asynccontextmanager
async def running(tier):
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        yield tier
        nursery.cancel_scope.cancel()


async def wait_for(predicate, timeout=10):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def raw_set(server, ckey, value):
    """Store `value` under `ckey` as anyone on the network could."""
    stream = await trio.open_tcp_stream('127.0.0.1', server.port)
    connection = MetaConnection(stream)
    try:
        assert await connection.add(ckey, value[:0], value, replace=True)
    finally:
        connection.close()


# -- hits, misses, fills --

class MutableStore(MemoryStore):
    """Hands out bytearrays and keeps them, so a test can change one after the read (what a
    block buffer reused too early would do)."""

    def __init__(self):
        super().__init__()
        self.handed = []

    async def read(self, key, etag, offset, length):
        data = bytearray(await super().read(key, etag, offset, length))
        self.handed.append(data)
        return data


async def test_a_block_changed_between_its_store_read_and_its_fill_is_not_stored(memcached,
                                                                                 caplog):
    store = MutableStore()
    filler, reader = make_tier(memcached.url, store=store), make_tier(memcached.url)
    key = new_key()
    caplog.set_level(logging.ERROR, 'cachefs.cache')
    async with running(filler), running(reader):
        # the fill workers run only once this task yields: the bytes change before the seal
        data = await filler.read(key, 'etag', 0, BLOCK)
        store.handed[0][100:200] = bytes(100)
        await wait_for(lambda: filler.stats()['cluster_fill_errors'] == 1)
        assert filler.stats()['cluster_fills'] == 0
        assert sha(await reader.read(key, 'etag', 0, BLOCK)) == sha(block_bytes(key, 0, BLOCK))
    assert data is store.handed[0]
    assert reader.stats()['cluster_hits'] == 0      # nothing stored: the store's bytes again
    assert [r for r in caplog.records if 'changed between its store read' in r.getMessage()]


async def test_a_changed_block_whose_fill_probes_a_down_peer_leaves_it_probeable(memcached):
    store, clock = MutableStore(), Clock()
    filler = make_tier(memcached.url, store=store, clock=clock)
    await filler.read(new_key(), 'etag', 0, BLOCK)      # not running: its fill stays queued
    store.handed[0][100:200] = bytes(100)
    peer = filler.peers.peers[0]
    peer.failed('taken down by the test', probe=False)
    clock.now += 60                                      # due for a probe: the fill takes it
    async with trio.open_nursery() as nursery:          # the fills alone, no refresh's probe
        nursery.start_soon(filler._fill_worker)
        await wait_for(lambda: filler.counters.fill_errors == 1)
        nursery.cancel_scope.cancel()
    assert peer.admit() is None                          # the next request probes it


async def test_a_value_evicted_from_extstore_is_a_miss_not_a_failing_peer(tmp_path):
    # memcached 1.6.18 answers a get whose item's value was on an extstore page since evicted
    # with a bare `EN`, without the request's opaque token: a miss like any other, not a reply
    # to another request (which would mark the peer down for 5 s)
    server = Memcached(item_size='8m', memory='64', user='root', extra=[
        '-o', f'ext_page_size=16,ext_wbuf_size=8,ext_threads=2,ext_item_age=0,'
              f'ext_path={tmp_path / "extstore"}:128M']).start()
    sealer, length = Sealer(), 4 * BLOCK
    try:
        keys = [cluster_key(NAMESPACE, new_key(), 'etag', 0, length, BLOCK) for _ in range(80)]
        for ckey in keys:       # 320 MiB into 64 MiB of RAM and 128 MiB of extstore
            data = os.urandom(length)
            await raw_set(server, ckey, sealer.seal(ckey, data) + data)
        await trio.sleep(1)     # the flusher writes what is left in RAM
        stream = await trio.open_tcp_stream('127.0.0.1', server.port)
        connection = MetaConnection(stream)
        try:
            answers = [await connection.get(ckey, length) for ckey in keys]
        finally:
            connection.close()
    finally:
        server.stop()
    misses = sum(answer is None for answer in answers)
    assert 0 < misses < len(keys)


async def test_a_node_that_takes_no_leases_waits_for_the_fill_of_the_node_that_took_one(
        memcached):
    # memcached keeps an empty item while another node holds the lease of a block (`VA 0 Z`):
    # that is a fill on its way, not a block to refuse, also for a node that never fills
    # (--cluster-fill-queue 0, no leases of its own)
    key, length = new_key(), BLOCK
    ckey = cluster_key(NAMESPACE, key, 'etag', 0, length, BLOCK)
    stream = await trio.open_tcp_stream('127.0.0.1', memcached.port)
    holder = MetaConnection(stream)
    reader = make_tier(memcached.url, fill_queue=0)
    try:
        assert await holder.get(ckey, length, lease=10) == WON
        async with running(reader), trio.open_nursery() as nursery:
            got = []

            async def read():
                got.append(await reader.read(key, 'etag', 0, length))
            nursery.start_soon(read)
            await trio.sleep(0.05)
            data = block_bytes(key, 0, length)
            await holder.add(ckey, Sealer().seal(ckey, data), data, replace=True)
    finally:
        holder.close()
    assert sha(got[0]) == sha(block_bytes(key, 0, length))
    stats = reader.stats()
    assert stats['cluster_hits'] == 1 and stats['cluster_waits'] == 1
    assert stats['cluster_refused_blocks'] == 0 and stats['cluster_errors'] == 0
    assert reader.store.reads == []

async def test_a_block_read_from_the_store_is_filled_and_then_served_by_the_cluster(memcached):
    key = new_key()
    node_a, node_b = make_tier(memcached.url), make_tier(memcached.url)
    async with running(node_a), running(node_b):
        first = await node_a.read(key, '"e1"', 0, BLOCK)
        assert node_a.store.reads == [(key, 0)]
        assert node_a.counters.misses == 1
        await wait_for(lambda: node_a.counters.fills == 1)
        assert node_a.counters.fill_bytes == BLOCK
        second = await node_b.read(key, '"e1"', 0, BLOCK)
    assert node_b.store.reads == []                     # the other node never asked the store
    assert sha(second) == sha(first) == sha(block_bytes(key, 0, BLOCK))
    assert type(second) is bytearray and len(second) == BLOCK
    stats = node_b.stats()
    assert stats['cluster_hits'] == 1 and stats['cluster_read_bytes'] == BLOCK
    assert stats['cluster_errors'] == 0 and stats['cluster_peers_up'] == 1
    assert stats['cluster_peer_states'] == {f'127.0.0.1:{memcached.port}': 'up'}


async def test_a_short_last_block_and_another_etag_are_blocks_of_their_own(memcached):
    key = new_key()
    node_a, node_b = make_tier(memcached.url), make_tier(memcached.url)
    async with running(node_a), running(node_b):
        await node_a.read(key, '"e1"', BLOCK, 1234)
        await wait_for(lambda: node_a.counters.fills == 1)
        assert sha(await node_b.read(key, '"e1"', BLOCK, 1234)) == sha(block_bytes(key, BLOCK,
                                                                               1234))
        await node_b.read(key, '"e2"', BLOCK, 1234)         # a new version: not the old bytes
    assert node_b.counters.hits == 1 and node_b.counters.misses == 1
    assert node_b.store.reads == [(key, BLOCK)]


async def test_a_block_several_nodes_fill_is_stored_once(memcached):
    key = new_key()
    nodes = [make_tier(memcached.url) for _ in range(3)]
    async with running(nodes[0]), running(nodes[1]), running(nodes[2]):
        for node in nodes:
            await node.read(key, '"e"', 0, BLOCK)
        await wait_for(lambda: sum(n.counters.fills for n in nodes) >= 1
                       and all(n.stats()['cluster_fill_queue'] == 0 for n in nodes))
        await trio.sleep(0.1)
    # the first read filled; the others found it (hits) or lost the add race, never a second copy
    assert sum(n.counters.fills for n in nodes) == 1
    assert sum(n.counters.fill_errors for n in nodes) == 0


# -- forged and foreign blocks --

def _forged(kind, key, ckey):
    data = block_bytes(key, 0, BLOCK)
    sealer = Sealer()
    if kind == 'wrong data, right length':
        wrong = bytearray(data)
        wrong[BLOCK // 2] ^= 1
        return sealer.seal(ckey, data) + bytes(wrong)
    if kind == "a valid header with another key's checksum":
        other = cluster_key(NAMESPACE, key, '"e1"', BLOCK, BLOCK, BLOCK)
        return sealer.seal(other, data) + data
    if kind == 'truncated value':
        return (sealer.seal(ckey, data) + data)[:-1]
    if kind == 'a header alone':
        return sealer.seal(ckey, data)
    if kind == 'not a cachefs block':
        return os.urandom(BLOCK + 48)
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['wrong data, right length',
                                  "a valid header with another key's checksum",
                                  'truncated value', 'a header alone', 'not a cachefs block'])
async def test_a_forged_block_is_refused_and_the_store_bytes_served(memcached, kind, caplog):
    key = new_key()
    ckey = cluster_key(NAMESPACE, key, '"e1"', 0, BLOCK, BLOCK)
    await raw_set(memcached, ckey, _forged(kind, key, ckey))
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    node = make_tier(memcached.url)
    async with running(node):
        got = await node.read(key, '"e1"', 0, BLOCK)
        assert sha(got) == sha(block_bytes(key, 0, BLOCK))
        assert node.store.reads == [(key, 0)]
        assert node.counters.refused_blocks == 1 and node.counters.hits == 0
        assert node.peers.peers[0].up                   # the block is bad, not the peer
        # the store's bytes replace the forged block in the cluster
        await wait_for(lambda: node.counters.fills == 1)
    again = make_tier(memcached.url)
    async with running(again):
        assert sha(await again.read(key, '"e1"', 0, BLOCK)) == sha(block_bytes(key, 0, BLOCK))
    assert again.counters.hits == 1 and again.store.reads == []
    refusals = [r for r in caplog.records if 'refused a block' in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]


async def test_more_refused_blocks_are_counted_not_logged_again(memcached, caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    node = make_tier(memcached.url, fill_queue=0)
    keys = [new_key() for _ in range(3)]
    for key in keys:
        ckey = cluster_key(NAMESPACE, key, '"e"', 0, BLOCK, BLOCK)
        await raw_set(memcached, ckey, _forged('wrong data, right length', key, ckey))
    for key in keys:
        assert sha(await node.read(key, '"e"', 0, BLOCK)) == sha(block_bytes(key, 0, BLOCK))
    assert node.counters.refused_blocks == 3
    assert len([r for r in caplog.records if 'refused a block' in r.getMessage()]) == 1


async def test_a_block_filled_with_another_secret_or_none_is_refused(memcached, tmp_path):
    ours, theirs = b'our-shared-secret-0123456789', b'their-secret-0123456789abc'
    key = new_key()
    filler = make_tier(memcached.url, secret=theirs)
    async with running(filler):
        await filler.read(key, '"e"', 0, BLOCK)
        await wait_for(lambda: filler.counters.fills == 1)
    for secret in (ours, None):
        reader = make_tier(memcached.url, secret=secret, fill_queue=0)
        got = await reader.read(key, '"e"', 0, BLOCK)
        assert sha(got) == sha(block_bytes(key, 0, BLOCK))
        assert reader.counters.refused_blocks == 1 and reader.store.reads == [(key, 0)]
    same = make_tier(memcached.url, secret=theirs, fill_queue=0)
    assert sha(await same.read(key, '"e"', 0, BLOCK)) == sha(block_bytes(key, 0, BLOCK))
    assert same.counters.hits == 1 and same.store.reads == []


def test_the_secret_file_must_exist_and_hold_16_bytes(tmp_path):
    good = tmp_path / 'secret'
    good.write_text('0123456789abcdef0123\n')
    assert read_secret(str(good)) == b'0123456789abcdef0123'
    short = tmp_path / 'short'
    short.write_text('too short\n')
    for path, message in ((short, 'at least 16 bytes'), (tmp_path / 'missing', 'No such file')):
        with pytest.raises(UserError, match=message) as caught:
            read_secret(str(path))
        assert caught.value.exit_code == 2


# -- dead, hanging, returning and restarted peers --

def closed_port():
    return free_port()          # nothing listens there: connections are refused


async def test_a_peer_that_refuses_connections_is_skipped_after_one_try(caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    node = make_tier(f'memcached://127.0.0.1:{closed_port()}', connect_timeout=0.05)
    key = new_key()
    for index in range(20):
        got = await node.read(key, '"e"', index * BLOCK, BLOCK)
        assert sha(got) == sha(block_bytes(key, index * BLOCK, BLOCK))
    assert node.counters.errors == 1 and node.counters.skipped == 19
    assert len(node.store.reads) == 20
    downs = [r.getMessage() for r in caplog.records if 'is down' in r.getMessage()]
    assert len(downs) == 1 and 'cannot connect' in downs[0], downs
    assert list(node.stats()['cluster_peer_states'].values()) == ['down']


async def test_a_peer_that_accepts_and_never_answers_costs_at_most_the_timeout_once(caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    held = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(_hold, held=held), 0,
                                                host='127.0.0.1'))
        port = listeners[0].socket.getsockname()[1]
        node = make_tier(f'memcached://127.0.0.1:{port}', read_timeout=0.2)
        key = new_key()
        started = trio.current_time()
        got = await node.read(key, '"e"', 0, BLOCK)
        first = trio.current_time() - started
        assert sha(got) == sha(block_bytes(key, 0, BLOCK))
        started = trio.current_time()
        for index in range(1, 10):
            await node.read(key, '"e"', index * BLOCK, BLOCK)
        rest = trio.current_time() - started
        nursery.cancel_scope.cancel()
    # bounded by the read timeout (not a speed figure: the bound the option promises)
    assert 0.2 <= first < 0.2 + 2.0, first
    assert rest < 2.0, rest                    # skipped: no second wait for that peer
    assert node.counters.timeouts == 1 and node.counters.skipped == 9
    assert len([r for r in caplog.records if 'is down' in r.getMessage()]) == 1


async def test_reads_waiting_their_turn_skip_a_peer_that_went_down_meanwhile():
    held = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(_hold, held=held), 0,
                                                host='127.0.0.1'))
        port = listeners[0].socket.getsockname()[1]
        node = make_tier(f'memcached://127.0.0.1:{port}', read_timeout=0.2, max_reads=2)
        key = new_key()
        got = {}

        async def read(index):
            got[index] = await node.read(key, '"e"', index * BLOCK, BLOCK)
        async with trio.open_nursery() as readers:
            for index in range(6):
                readers.start_soon(read, index)
        nursery.cancel_scope.cancel()
    # the first two time out and take the peer down; the four behind them do not ask it
    assert node.counters.timeouts == 2 and node.counters.skipped == 4
    assert all(sha(got[i]) == sha(block_bytes(key, i * BLOCK, BLOCK)) for i in range(6))


async def _hold(stream, held):
    held.append(stream)
    await trio.sleep_forever()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def test_a_peer_that_comes_back_is_used_again(own_memcached, caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    clock = Clock()
    node = make_tier(own_memcached.url, clock=clock)
    key = new_key()
    await node.read(key, '"e"', 0, BLOCK)                   # nothing listens yet
    assert not node.peers.peers[0].up
    own_memcached.start()
    await node.read(key, '"e"', BLOCK, BLOCK)               # still skipped: within 5 s
    assert node.counters.skipped == 1
    clock.now += 5
    async with running(node):
        await node.read(key, '"e"', 2 * BLOCK, BLOCK)       # the probe: a miss, then filled
        assert node.peers.peers[0].up and node.counters.misses == 1
        await wait_for(lambda: node.counters.fills == 1)
        got = await node.read(key, '"e"', 2 * BLOCK, BLOCK)
    assert node.counters.hits == 1 and sha(got) == sha(block_bytes(key, 2 * BLOCK, BLOCK))
    changes = [r.getMessage() for r in caplog.records if 'cluster peer' in r.getMessage()]
    assert len(changes) == 2 and 'is down' in changes[0] and 'answers again' in changes[1], \
        changes


async def test_a_restarted_peer_costs_no_error_and_no_warning(own_memcached, caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    own_memcached.start()
    node = make_tier(own_memcached.url)
    key = new_key()
    async with running(node):
        await node.read(key, '"e"', 0, BLOCK)
        await wait_for(lambda: node.counters.fills == 1)
        assert node.peers.peers[0].idle                     # a pooled connection
        own_memcached.stop()
        own_memcached.start()                               # empty, same port
        got = await node.read(key, '"e"', 0, BLOCK)
    assert sha(got) == sha(block_bytes(key, 0, BLOCK))
    assert node.counters.errors == 0 and node.counters.misses == 2
    assert node.peers.peers[0].up
    assert not [r for r in caplog.records if 'cluster peer' in r.getMessage()]


async def test_bytes_a_peer_sends_after_its_answer_are_never_taken_for_the_next(caplog):
    """A scripted peer answers each get with a valid value followed by a forged one: the
    connection is not reused for the next request, so the forged bytes are never read."""
    key = new_key()
    sealer = Sealer()
    connections = []

    async def peer(stream):
        connections.append(stream)
        request = b''
        while b'\r\n' not in request:
            request += await stream.receive_some(4096)
        words = request.split()
        ckey, opaque = words[1].decode(), int(words[3][1:])
        offset = 0 if ckey == cluster_key(NAMESPACE, key, '"e"', 0, BLOCK, BLOCK) else BLOCK
        data = block_bytes(key, offset, BLOCK)
        value = sealer.seal(ckey, data) + data
        await stream.send_all(b'VA %d O%d\r\n' % (len(value), opaque) + value + b'\r\n')
        wrong = bytes(BLOCK)
        forged = sealer.seal(ckey, wrong) + wrong
        try:
            await stream.send_all(b'VA %d O%d\r\n' % (len(forged), opaque + 1) + forged
                                  + b'\r\n')
        except trio.BrokenResourceError:
            return          # the client dropped the connection instead of reading this
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer, 0, host='127.0.0.1'))
        port = listeners[0].socket.getsockname()[1]
        node = make_tier(f'memcached://127.0.0.1:{port}', fill_queue=0)
        first = await node.read(key, '"e"', 0, BLOCK)
        await trio.sleep(0.1)                      # the forged answer has arrived by now
        second = await node.read(key, '"e"', BLOCK, BLOCK)
        nursery.cancel_scope.cancel()
    assert sha(first) == sha(block_bytes(key, 0, BLOCK))
    assert sha(second) == sha(block_bytes(key, BLOCK, BLOCK))
    assert node.counters.hits == 2 and len(connections) == 2


# -- fills --

async def test_a_full_fill_queue_drops_fills_and_never_blocks_a_read(memcached):
    node = make_tier(memcached.url, fill_queue=2)           # not running: nothing sends fills
    key = new_key()
    for index in range(6):
        got = await node.read(key, '"e"', index * BLOCK, BLOCK)
        assert sha(got) == sha(block_bytes(key, index * BLOCK, BLOCK))
    stats = node.stats()
    assert stats['cluster_fill_queue'] == 2 and stats['cluster_fills_dropped'] == 4


async def test_a_node_with_fill_queue_0_only_reads(memcached):
    node = make_tier(memcached.url, fill_queue=0)
    async with running(node):
        await node.read(new_key(), '"e"', 0, BLOCK)
        await trio.sleep(0.1)
    assert node.counters.fills == 0 and node.counters.fills_dropped == 0


async def test_a_peer_whose_items_are_too_small_for_a_block_gets_one_warning(caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    server = Memcached(item_size='1m').start()
    try:
        node = ClusterTier(MemoryStore(), server.url, NAMESPACE, 2 * BLOCK, connect_timeout=0.2,
                           read_timeout=0.5)
        key = new_key()
        async with running(node):
            for index in range(3):
                got = await node.read(key, '"e"', index * 2 * BLOCK, 2 * BLOCK)
                assert sha(got) == sha(block_bytes(key, index * 2 * BLOCK, 2 * BLOCK))
            await wait_for(lambda: node.counters.fill_errors == 3)
    finally:
        server.stop()
    assert node.peers.peers[0].up and node.counters.errors == 0
    warnings = [r.getMessage() for r in caplog.records if 'too large' in r.getMessage()]
    assert len(warnings) == 1 and '-I' in warnings[0], warnings


async def test_a_cluster_that_answers_nowhere_at_mount_is_a_warning(caplog):
    caplog.set_level(logging.INFO, 'cachefs.cache')
    node = make_tier(f'memcached://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}',
                     connect_timeout=0.05)
    async with running(node):
        key = new_key()
        assert sha(await node.read(key, '"e"', 0, BLOCK)) == sha(block_bytes(key, 0, BLOCK))
    assert any(r.levelno == logging.WARNING and 'no peer answers' in r.getMessage()
               for r in caplog.records)
    assert node.stats()['cluster_peers_up'] == 0


# -- through mounts --

@pytest.mark.fuse
def test_a_second_node_reads_a_whole_tree_from_the_cluster_and_nothing_from_the_store(
        local_source, mounter, own_memcached):
    """Two mounts of one source with their own caches, like two nodes: the second finds every
    block the first read in the cluster (fills waited for), so its store reads nothing."""
    own_memcached.start()
    secret = mounter.tmp_path / 'cluster.secret'
    secret.write_text('0123456789abcdef0123456789abcdef\n')
    # a queue as long as the tree, so that no fill is dropped while the first node reads
    # and a long timeout: a peer taken for down on this busy machine would send reads to the
    # store (what this test counts)
    cluster = ['-o', f'cluster={own_memcached.url},cluster_fill_queue=4096,cluster_timeout=10s',
               '--cluster-secret-file', secret]
    first = mounter.mount(local_source, *cluster, name='node1',
                          cache_dir=mounter.tmp_path / 'cache1')
    assert_tree_matches(first.path, local_source.manifest)
    assert wait_until(lambda: first.stats()['cluster_fill_queue'] == 0)
    filled = first.stats()
    assert filled['cluster_fills'] == filled['cluster_misses'] > 0
    assert filled['cluster_fill_errors'] == filled['cluster_fills_dropped'] == 0
    time.sleep(0.5)         # a fill taken from the queue may still be on its way
    second = mounter.mount(local_source, *cluster, name='node2',
                           cache_dir=mounter.tmp_path / 'cache2')
    assert_tree_matches(second.path, local_source.manifest)
    stats = second.stats()
    assert stats['store_bytes'] == 0 and stats['store_requests'] == 0, (stats, filled)
    assert stats['cluster_hits'] == filled['cluster_fills']
    assert stats['cluster_errors'] == stats['cluster_refused_blocks'] == 0
    lines = run_cachefs('stats', second.path).stdout
    assert f"cluster tier    {stats['cluster_hits']} hits" in lines
    assert 'cluster peers   1 of 1 up' in lines


async def test_a_host_name_is_resolved_to_its_peers(memcached):
    node = make_tier(f'memcached://localhost:{memcached.port}')
    assert node.peers.peers == ()               # names wait for the first resolution
    async with running(node):
        assert [p.name for p in node.peers.peers] == [f'127.0.0.1:{memcached.port}']
        key = new_key()
        await node.read(key, '"e"', 0, BLOCK)
        await wait_for(lambda: node.counters.fills == 1)


@pytest.mark.fuse
def test_a_mount_whose_cluster_answers_nowhere_mounts_with_a_warning(local_source, mounter):
    mounted = mounter.mount(local_source, '--cluster',
                            f'memcached://127.0.0.1:{closed_port()}', name='alone')
    assert_tree_matches(mounted.path, local_source.manifest)
    stats = mounted.stats()
    assert stats['cluster_peers_up'] == 0 and stats['cluster_hits'] == 0
    log = mounted.log_file.read_text()
    assert 'WARNING cachefs.cache.cluster: cluster tier' in log and 'no peer answers' in log
    assert log.count('is down') == 1


async def test_a_peer_killed_while_blocks_are_read_costs_no_read_and_no_wrong_byte(own_memcached,
                                                                                   caplog):
    caplog.set_level(logging.WARNING, 'cachefs.cache')
    own_memcached.start()
    key = new_key()
    filler = make_tier(own_memcached.url)
    async with running(filler):
        for index in range(40):
            await filler.read(key, '"e"', index * BLOCK, BLOCK)
        await wait_for(lambda: filler.counters.fills == 40)
    node = make_tier(own_memcached.url)
    results = {}

    async def reader(first):
        for index in range(first, 40, 8):
            results[index] = await node.read(key, '"e"', index * BLOCK, BLOCK)
            await trio.sleep(0.01)

    async with running(node):
        async with trio.open_nursery() as nursery:
            for first in range(8):
                nursery.start_soon(reader, first)
            await wait_for(lambda: node.counters.hits >= 8)
            own_memcached.process.kill()            # mid-read: SIGKILL, no goodbye
            own_memcached.process.wait()
    assert sorted(results) == list(range(40))
    for index, data in results.items():
        assert sha(data) == sha(block_bytes(key, index * BLOCK, BLOCK)), index
    assert node.counters.hits + len(node.store.reads) == 40 and node.store.reads
    assert len([r for r in caplog.records if 'is down' in r.getMessage()]) == 1


# -- cross-node single flight --

class GatedStore(MemoryStore):
    """A store whose reads wait until `release` is set (a slow store)."""

    def __init__(self):
        super().__init__()
        self.release = trio.Event()

    async def read(self, key, etag, offset, length):
        self.reads.append((key, offset))
        await self.release.wait()
        return block_bytes(key, offset, length)


async def test_nodes_that_miss_a_block_at_once_read_it_from_the_store_once(memcached):
    key = new_key()
    slow = GatedStore()
    winner, other = make_tier(memcached.url, slow), make_tier(memcached.url)
    got = {}

    async def read(name, node):
        got[name] = await node.read(key, '"e"', 0, BLOCK)

    async with running(winner), running(other):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 'winner', winner)
            await wait_for(lambda: slow.reads)             # the winner holds the lease
            nursery.start_soon(read, 'other', other)
            await wait_for(lambda: other.counters.waits == 1)
            slow.release.set()
    assert sha(got['winner']) == sha(got['other']) == sha(block_bytes(key, 0, BLOCK))
    assert slow.reads == [(key, 0)] and other.store.reads == []
    assert other.counters.hits == 1 and other.counters.wait_timeouts == 0
    assert winner.counters.fills == 1


async def test_a_lease_never_filled_costs_the_others_at_most_twice_the_timeout(memcached):
    key = new_key()
    winner = make_tier(memcached.url)           # not running: its fill stays queued
    await winner.read(key, '"e"', 0, BLOCK)
    other = make_tier(memcached.url, read_timeout=0.1)
    started = trio.current_time()
    got = await other.read(key, '"e"', 0, BLOCK)
    waited = trio.current_time() - started
    assert sha(got) == sha(block_bytes(key, 0, BLOCK))
    assert other.counters.waits == other.counters.wait_timeouts == 1
    assert other.store.reads == [(key, 0)]
    # the bound the option promises (2 x 0.1 s), not a speed figure
    assert 0.15 <= waited < other.lease_wait + 1.0, waited


async def test_at_most_max_reads_blocks_are_read_from_peers_at_once():
    """The budget of the store's reads (--store-concurrency blocks) covers the cluster's."""
    key = new_key()
    sealer = Sealer()
    state = {'now': 0, 'most': 0}

    async def peer(stream):
        while True:
            request = b''
            while b'\r\n' not in request:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
            words = request.split()
            ckey, opaque = words[1].decode(), int(words[-1][1:])
            state['now'] += 1
            state['most'] = max(state['most'], state['now'])
            await trio.sleep(0.05)
            state['now'] -= 1
            offset = next(i * BLOCK for i in range(8)
                          if cluster_key(NAMESPACE, key, '"e"', i * BLOCK, BLOCK, BLOCK) == ckey)
            data = block_bytes(key, offset, BLOCK)
            value = sealer.seal(ckey, data) + data
            await stream.send_all(b'VA %d O%d\r\n' % (len(value), opaque) + value + b'\r\n')

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer, 0, host='127.0.0.1'))
        port = listeners[0].socket.getsockname()[1]
        node = make_tier(f'memcached://127.0.0.1:{port}', fill_queue=0, max_reads=2)
        got = {}

        async def read(index):
            got[index] = await node.read(key, '"e"', index * BLOCK, BLOCK)
        async with trio.open_nursery() as readers:
            for index in range(8):
                readers.start_soon(read, index)
        nursery.cancel_scope.cancel()
    assert state['most'] == 2 and node.counters.hits == 8
    assert all(sha(got[i]) == sha(block_bytes(key, i * BLOCK, BLOCK)) for i in range(8))


async def test_a_peer_that_goes_down_while_a_node_waits_for_a_lease_can_still_be_probed(
        memcached):
    key = new_key()
    winner = make_tier(memcached.url)            # not running: its fill stays queued
    await winner.read(key, '"e"', 0, BLOCK)
    clock = Clock()
    waiting = make_tier(memcached.url, clock=clock, read_timeout=0.5)
    peer = waiting.peers.peers[0]

    async def take_it_down():
        await wait_for(lambda: waiting.counters.waits == 1)
        peer.failed('taken down by the test', probe=False)
        clock.now += 60                          # due for a probe
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_it_down)
        got = await waiting.read(key, '"e"', 0, BLOCK)
    assert sha(got) == sha(block_bytes(key, 0, BLOCK))
    assert peer.admit() is None                  # the next request probes it


@pytest.mark.fuse
@pytest.mark.parametrize('mode', [['--foreground'], []], ids=['foreground', 'background'])
@pytest.mark.parametrize('secret, message', [
    ('short\n', 'the secret must be at least 16 bytes'),
    (None, 'No such file or directory'),
])
def test_a_bad_secret_file_is_one_line_and_exit_2_before_anything_is_made(tmp_path, mode, secret,
                                                                         message):
    path = tmp_path / 'secret'
    if secret is not None:
        path.write_text(secret)
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    result = run_cachefs('mount', tmp_path, mountpoint, '--cache-dir', tmp_path / 'cache',
                         '--cluster', 'memcached://127.0.0.1:1', '--cluster-secret-file', path,
                         *mode, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f'cachefs: error: --cluster-secret-file {path}: {message}' + (
        ' (e.g. openssl rand -hex 32)\n' if secret else '\n')
    assert not (tmp_path / 'cache').exists()
