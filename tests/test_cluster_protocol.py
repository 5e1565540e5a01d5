"""The cluster tier's pure logic: cluster keys, sealed blocks, the meta protocol parser against
hostile answers (hypothesis, over in-memory streams: refused, never a wrong byte, never a
hang), rendezvous hashing, the circuit breaker, peer resolution and the --cluster option.

What a real memcached adds (hits, fills, dead and hanging peers) is in test_cluster_tier.py.
"""

import logging

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.cache import cluster_peers
from cachefs.cache.cluster_peers import (ClusterURL, Peer, PeerSet, parse_cluster_url,
                                         rendezvous)
from cachefs.cache.cluster_protocol import (BUSY, HEADER_SIZE, WON, BlockRefused, MetaConnection,
                                            PeerFailure, Sealer, ServerRefused, cluster_key,
                                            cluster_namespace, parse_reply)
from cachefs.config import expand_dash_o

NS = cluster_namespace('s3://bucket/prefix|http://127.0.0.1:8333')


# -- keys --

def test_a_cluster_key_is_a_short_printable_memcached_key_whatever_the_object_key_holds():
    for key in ['a', 'with space/and\nnewline', 'ünïcödé/ø', 'x' * 1024, '\udcff\x00']:
        ckey = cluster_key(NS, key, '"etag"', 4 << 20, 4 << 20, 4 << 20)
        assert len(ckey) <= 250 and all('!' <= c <= '~' for c in ckey), ckey


def test_a_cluster_key_binds_key_etag_offset_length_and_block_size():
    base = ('k', 'e', 0, 100, 1 << 20)
    keys = {cluster_key(NS, *base)}
    for index, changed in enumerate(['k2', 'e2', 1, 101, 1 << 21]):
        fields = list(base)
        fields[index] = changed
        keys.add(cluster_key(NS, *fields))
    keys.add(cluster_key(NS, 'k\0e', '', 0, 100, 1 << 20))      # no ambiguity by splitting
    assert len(keys) == 7


def test_two_sources_never_share_a_cluster_key():
    other = cluster_namespace('s3://other-bucket/prefix|http://127.0.0.1:8333')
    assert other != NS
    assert cluster_key(NS, 'k', 'e', 0, 10, 1 << 20) != cluster_key(other, 'k', 'e', 0, 10,
                                                                     1 << 20)


# -- sealed blocks --

DATA = bytes(range(256)) * 64
KEY = cluster_key(NS, 'train/shard-0001', '"abc"', 0, len(DATA), 1 << 20)
OTHER_KEY = cluster_key(NS, 'train/shard-0002', '"abc"', 0, len(DATA), 1 << 20)


@pytest.mark.parametrize('secret', [None, b'0123456789abcdef-secret'])
def test_a_sealed_block_verifies(secret):
    sealer = Sealer(secret)
    header = sealer.seal(KEY, DATA)
    assert len(header) == HEADER_SIZE
    sealer.check(KEY, header, DATA)
    sealer.check(KEY, header, bytearray(DATA))
    sealer.check(KEY, header, memoryview(DATA))


@pytest.mark.parametrize('secret', [None, b'0123456789abcdef-secret'])
def test_every_bit_flip_of_header_or_data_is_refused(secret):
    sealer = Sealer(secret)
    data = DATA[:64]
    key = cluster_key(NS, 'k', 'e', 0, len(data), 1 << 20)
    sealed = sealer.seal(key, data) + data
    for bit in range(len(sealed) * 8):
        flipped = bytearray(sealed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BlockRefused):
            sealer.check(key, flipped[:HEADER_SIZE], flipped[HEADER_SIZE:])


def test_a_valid_header_of_another_key_is_refused():
    sealer = Sealer()
    with pytest.raises(BlockRefused, match='checksum'):
        sealer.check(KEY, sealer.seal(OTHER_KEY, DATA), DATA)


def test_a_truncated_or_extended_block_is_refused():
    sealer = Sealer()
    header = sealer.seal(KEY, DATA)
    for data in (DATA[:-1], DATA + b'\0', b''):
        with pytest.raises(BlockRefused):
            sealer.check(KEY, header, data)
    with pytest.raises(BlockRefused):
        sealer.check(KEY, header[:-1], DATA)


def test_a_block_sealed_with_another_secret_or_none_is_refused():
    ours, theirs, none = Sealer(b'our-secret-of-16+bytes'), Sealer(b'their-secret-16+bytes'), \
        Sealer()
    with pytest.raises(BlockRefused, match='checksum'):
        ours.check(KEY, theirs.seal(KEY, DATA), DATA)
    with pytest.raises(BlockRefused, match='without the shared secret'):
        ours.check(KEY, none.seal(KEY, DATA), DATA)
    with pytest.raises(BlockRefused, match='sealed with a secret'):
        none.check(KEY, ours.seal(KEY, DATA), DATA)


def test_an_unkeyed_block_claiming_to_be_keyed_is_refused():
    # a forger without the secret flips the keyed flag and recomputes nothing: refused
    none, ours = Sealer(), Sealer(b'our-secret-of-16+bytes')
    header = bytearray(none.seal(KEY, DATA))
    header[5] = 1
    with pytest.raises(BlockRefused):
        ours.check(KEY, bytes(header), DATA)


@pytest.mark.parametrize('secret', [None, b'our-secret-of-16+bytes'], ids=['unkeyed', 'keyed'])
def test_a_block_of_format_version_1_is_refused(secret):
    # version 1 carried a BLAKE2b checksum: a block a node of the older format filled is not
    # checked against today's checksum, it is refused (and then replaced by the store's bytes)
    sealer = Sealer(secret)
    header = bytearray(sealer.seal(KEY, DATA))
    header[4] = 1
    with pytest.raises(BlockRefused, match='not a cachefs block of this version'):
        sealer.check(KEY, bytes(header), DATA)


# -- the meta protocol --

@pytest.mark.parametrize('line, opaque, expected', [
    (b'EN O7', 7, ('EN', None)),
    (b'EN', 7, ('EN', None)),       # memcached 1.6.18's miss of a value evicted from extstore
    (b'VA 48 O7', 7, ('VA', 48)),
    (b'VA 48 O7 t-1 s48', 7, ('VA', 48)),
    (b'HD O3', 3, ('HD', None)),
    (b'NS O3', 3, ('NS', None)),
    (b'MN', None, ('MN', None)),
])
def test_well_formed_replies_parse(line, opaque, expected):
    assert parse_reply(line, opaque) == expected


@pytest.mark.parametrize('line', [
    b'', b'VA', b'VA O7', b'VA -1 O7', b'VA 1e3 O7', b'VA 12345678901 O7', b'VA 48', b'EN ',
    b'EN O8', b'EN t-1', b'HD', b'EN O7 O7', b'va 48 O7', b'VA  48 O7', b'VA 48 O7 ', b'XX O7',
    b'VA 48\tO7',
    b'VA 48 O7\x00', b'\xff\xfe', b'ERROR', b'CLIENT_ERROR bad data chunk', b'HD O7\r',
])
def test_anything_else_is_a_peer_failure(line):
    with pytest.raises(PeerFailure):
        parse_reply(line, 7)


def test_a_server_error_is_the_peer_refusing_not_failing():
    with pytest.raises(ServerRefused, match='too large'):
        parse_reply(b'SERVER_ERROR object too large for cache', 7)


async def _serve_one(answer_chunks, length, request_seen=None):
    """Run MetaConnection.get(length) against a peer that answers `answer_chunks` (the bytes
    after the request's opaque is known: a callable of the opaque) and then closes. Returns the
    result or the exception."""
    client, server = trio.testing.memory_stream_pair()
    connection = MetaConnection(client)

    async def peer():
        request = b''
        while b'\r\n' not in request:
            request += await server.receive_some(4096)
        if request_seen is not None:
            request_seen.append(request)
        opaque = int(request.split(b' O')[1].split(b'\r\n')[0])
        for chunk in answer_chunks(opaque):
            await server.send_all(chunk)
        await server.aclose()

    outcome: list = []

    async def ask():
        try:
            outcome.append(await connection.get(KEY, length))
        except (PeerFailure, BlockRefused, ServerRefused) as exc:
            outcome.append(exc)
    with trio.fail_after(5):            # never a hang: an answer cut short ends at the close
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            nursery.start_soon(ask)
    return outcome[0]


def _valid_answer(opaque, header, data, flags=b''):
    return b'VA %d O%d%s\r\n' % (len(header) + len(data), opaque, flags) + header + data + b'\r\n'


async def test_a_value_is_read_with_exact_framing_across_any_split():
    header = Sealer().seal(KEY, DATA)
    whole = _valid_answer(1, header, DATA)
    for size in (1, 2, 7, 48, 4096, len(whole)):
        chunks = [whole[i:i + size] for i in range(0, len(whole), size)]
        requests: list = []
        got = await _serve_one(lambda opaque: chunks, len(DATA), requests)
        assert requests == [b'mg ' + KEY.encode() + b' v O1\r\n']
        assert got == (header, DATA)
        assert type(got[1]) is bytearray


async def test_a_miss_is_none():
    assert await _serve_one(lambda opaque: [b'EN O%d\r\n' % opaque], 10) is None


async def test_a_huge_length_is_refused_before_reading_anything():
    got = await _serve_one(lambda opaque: [b'VA 9999999999 O%d\r\n' % opaque], len(DATA))
    assert isinstance(got, BlockRefused)


@pytest.mark.parametrize('answer', [
    lambda o, h, d: _valid_answer(o, h, d)[:-1],                       # no final LF
    lambda o, h, d: _valid_answer(o, h, d)[:-2] + b'XY',               # not CRLF
    lambda o, h, d: _valid_answer(o, h, d)[:100],                      # cut short
    lambda o, h, d: _valid_answer(o, h, d) + b'EN O2\r\n',             # bytes past the reply
    lambda o, h, d: _valid_answer(o + 1, h, d),                        # another request's
    lambda o, h, d: b'garbage\r\n',
    lambda o, h, d: b'x' * 5000,                                       # an endless line
    lambda o, h, d: b'',                                               # a close
])
async def test_a_malformed_answer_is_a_peer_failure(answer):
    header = Sealer().seal(KEY, DATA)
    got = await _serve_one(lambda opaque: [answer(opaque, header, DATA)], len(DATA))
    assert isinstance(got, PeerFailure), got


@st.composite
def hostile_answers(draw):
    """(answer bytes, chunk size): a valid answer mutated, or random bytes."""
    length = draw(st.integers(0, 300))
    data = draw(st.binary(min_size=length, max_size=length))
    header = draw(st.one_of(st.just(Sealer().seal(KEY, data)),
                            st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE)))
    size = draw(st.one_of(st.just(HEADER_SIZE + length), st.integers(0, 10 ** 10)))
    opaque_shift = draw(st.sampled_from([0, 0, 0, 1]))
    kind = draw(st.sampled_from(['value', 'miss', 'random', 'truncated', 'extended', 'mutated']))

    def make(opaque):
        value = b'VA %d O%d\r\n' % (size, opaque + opaque_shift) + header + data + b'\r\n'
        if kind == 'miss':
            return b'EN O%d\r\n' % (opaque + opaque_shift)
        if kind == 'random':
            return draw_random
        if kind == 'truncated':
            return value[:cut % (len(value) + 1)]
        if kind == 'extended':
            return value + extra
        if kind == 'mutated':
            mutated = bytearray(value)
            if mutated:
                mutated[cut % len(mutated)] ^= flip
            return bytes(mutated)
        return value
    draw_random = draw(st.binary(max_size=400))
    cut = draw(st.integers(0, 10 ** 6))
    extra = draw(st.binary(min_size=1, max_size=50))
    flip = draw(st.integers(1, 255))
    return make, length, draw(st.integers(1, 64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_answers())
def test_a_hostile_answer_is_refused_never_a_wrong_byte_never_a_hang(case):
    make, length, chunk = case
    sent: list = []

    def chunks(opaque):
        answer = make(opaque)
        sent.append((answer, opaque))
        return [answer[i:i + chunk] for i in range(0, len(answer), chunk)] or [b'']

    got = trio.run(_serve_one, chunks, length)
    answer, opaque = sent[0]
    if got is None:
        assert answer in (b'EN O%d\r\n' % opaque, b'EN\r\n')
    elif isinstance(got, tuple):
        header, data = got
        # only the exact answer to this request gives bytes back, and exactly its bytes (bytes
        # the peer sends after it arrive too late for this request: an idle connection with
        # something to read is never reused, test_cluster_tier checks that on a socket)
        assert answer.startswith(_valid_answer(opaque, header, data))
        assert len(answer) == len(_valid_answer(opaque, header, data)) or chunk < len(answer)
        assert len(data) == length      # whether they are the block is the sealer's to say
    else:
        assert isinstance(got, (PeerFailure, BlockRefused, ServerRefused))


# -- rendezvous hashing --

def _owners(names, keys):
    return {key: rendezvous(names, key) for key in keys}


KEYS = [cluster_key(NS, f'file-{i}', 'e', 0, 1, 1) for i in range(3000)]
PEERS = [f'10.0.0.{i}:11211' for i in range(1, 5)]


def test_rendezvous_spreads_blocks_evenly():
    counts: dict = {}
    for owner in _owners(PEERS, KEYS).values():
        counts[owner] = counts.get(owner, 0) + 1
    assert sorted(counts) == sorted(PEERS)
    assert all(600 < count < 900 for count in counts.values()), counts


def test_adding_a_peer_moves_only_the_blocks_it_takes():
    before = _owners(PEERS, KEYS)
    after = _owners(PEERS + ['10.0.0.9:11211'], KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == '10.0.0.9:11211' for key in moved)
    assert 400 < len(moved) < 800       # about a fifth


def test_removing_a_peer_moves_only_its_blocks():
    before = _owners(PEERS, KEYS)
    after = _owners(PEERS[1:], KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(before[key] == PEERS[0] for key in moved)
    assert all(after[key] != PEERS[0] for key in KEYS)


def test_rendezvous_does_not_depend_on_the_order_of_the_peers():
    assert _owners(PEERS, KEYS[:200]) == _owners(list(reversed(PEERS)), KEYS[:200])
    assert rendezvous([], KEYS[0]) is None


# -- the circuit breaker --

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_failed_peer_is_skipped_then_probed_once_with_a_doubling_wait(caplog):
    clock = Clock()
    peer = Peer('10.0.0.1', 11211, clock)
    caplog.set_level(logging.WARNING, 'cachefs.cache.cluster_peers')
    assert peer.admit() is True
    peer.failed('refused', probe=False)
    peer.failed('refused', probe=False)          # a request sent before it went down
    assert peer.admit() is False
    waits = []
    for _ in range(7):
        start = clock.now
        while peer.admit() is False:
            clock.now += 0.5
        waits.append(clock.now - start)
        assert peer.admit() is False             # one probe at a time
        peer.failed('refused', probe=True)
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    clock.now += 60
    assert peer.admit() is None
    peer.succeeded(probe=True)
    assert peer.up and peer.admit() is True
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages          # one per change of state
    assert 'is down (refused)' in messages[0] and 'answers again' in messages[1]


def test_a_peer_back_after_a_failure_starts_again_from_five_seconds():
    clock = Clock()
    peer = Peer('10.0.0.1', 11211, clock)
    peer.failed('x', probe=False)
    clock.now += 5
    assert peer.admit() is None
    peer.failed('x', probe=True)                  # 10 s
    clock.now += 10
    assert peer.admit() is None
    peer.succeeded(probe=True)
    peer.failed('x', probe=False)
    clock.now += 5
    assert peer.admit() is None


# -- peer resolution --

async def test_peers_are_resolved_again_and_keep_their_state(caplog):
    answers = {'cache.svc': [('10.0.0.1', 11211), ('10.0.0.2', 11211)]}

    def resolve(host, port):
        if answers.get(host) is None:
            raise OSError('Name or service not known')
        return answers[host]
    peers = PeerSet(parse_cluster_url('memcached://cache.svc,10.0.0.7:11300'))
    assert [p.name for p in peers.peers] == ['10.0.0.7:11300']     # IPs need no resolver
    await peers.refresh(resolve)
    assert [p.name for p in peers.peers] == ['10.0.0.1:11211', '10.0.0.2:11211', '10.0.0.7:11300']
    first, second = peers.peers[0], peers.peers[1]
    first.failed('x', probe=False)
    answers['cache.svc'] = [('10.0.0.1', 11211), ('10.0.0.3', 11211)]
    await peers.refresh(resolve)
    assert second.retired and not first.retired     # a removed peer keeps no idle connection
    assert [p.name for p in peers.peers] == ['10.0.0.1:11211', '10.0.0.3:11211', '10.0.0.7:11300']
    assert peers.peers[0] is first and not first.up
    caplog.set_level(logging.WARNING, 'cachefs.cache.cluster_peers')
    answers['cache.svc'] = None
    await peers.refresh(resolve)
    await peers.refresh(resolve)
    assert len(peers.peers) == 3                  # the last addresses kept
    assert [r.getMessage() for r in caplog.records if 'resolve' in r.getMessage()] == [
        'cannot resolve cluster host cache.svc (Name or service not known); keeping its last '
        'addresses']


async def test_a_name_that_never_resolved_leaves_no_peer_and_picks_none():
    def resolve(host, port):
        raise OSError('Name or service not known')
    peers = PeerSet(parse_cluster_url('memcached://nowhere.invalid'))
    await peers.refresh(resolve)
    assert peers.peers == () and peers.pick(KEYS[0]) is None


# -- the --cluster option --

@pytest.mark.parametrize('text, hosts', [
    ('memcached://cache.ns.svc', (('cache.ns.svc', 11211),)),
    ('memcached://10.0.0.1:11300,10.0.0.2', (('10.0.0.1', 11300), ('10.0.0.2', 11211))),
    ('memcached://[::1]:11211, node-2:1', (('::1', 11211), ('node-2', 1))),
    ('memcached://cache.ns.svc.cluster.local.:11211', (('cache.ns.svc.cluster.local.', 11211),)),
    ('memcached://a,a:11211', (('a', 11211),)),
])
def test_cluster_urls_parse(text, hosts):
    assert parse_cluster_url(text) == ClusterURL('memcached', hosts)


@pytest.mark.parametrize('text, message', [
    ('cache.ns.svc:11211', 'not a cluster URL'),
    ('redis://h', 'only memcached'),
    ('memcached://', 'empty host'),
    ('memcached://a,,b', 'empty host'),
    ('memcached://u:p@h', 'no path'),
    ('memcached://h/x', 'no path'),
    ('memcached://h:0', 'not a port'),
    ('memcached://h:65536', 'not a port'),
    ('memcached://h:', 'empty port'),
    ('memcached://h k', 'not a host'),
    ('memcached://-h', 'not a host'),
    ('memcached://a_b', 'not a host'),
    ('memcached://a..b', 'not a host'),
    ('memcached://a-.b', 'not a host'),
    ('memcached://' + 'a' * 64 + '.b', 'not a host'),
    ('memcached://[::1', 'IPv6'),
    ('memcached://[h]:1', 'not an IPv6'),
])
def test_bad_cluster_urls_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_cluster_url(text)
    assert '\n' not in str(caught.value)


def test_the_commas_of_a_cluster_list_survive_dash_o():
    assert expand_dash_o(['-o', 'cluster=memcached://10.0.0.1:11211,10.0.0.2,allow_other,'
                          'cluster_timeout=100ms']) == [
        '--cluster=memcached://10.0.0.1:11211,10.0.0.2', '--allow-other',
        '--cluster-timeout=100ms']
    assert expand_dash_o(['-o', 'ro,cluster=memcached://a,b', '-o', 'allow_other']) == [
        '--cluster=memcached://a,b', '--allow-other']


def test_peer_names_are_ip_and_port():
    assert cluster_peers.peer_name('::1', 11211) == '[::1]:11211'
    assert cluster_peers.peer_name('10.0.0.1', 1) == '10.0.0.1:1'


# -- stats and metrics --

CLUSTER_STATS = {
    'cluster_hits': 7, 'cluster_misses': 3, 'cluster_read_bytes': 7 << 20, 'cluster_fills': 3,
    'cluster_fill_bytes': 3 << 20, 'cluster_fills_dropped': 1, 'cluster_fill_errors': 0,
    'cluster_errors': 2, 'cluster_timeouts': 1, 'cluster_refused_blocks': 1,
    'cluster_skipped': 4, 'cluster_waits': 2, 'cluster_wait_timeouts': 1, 'cluster_fill_queue': 0,
    'cluster_peers': 2, 'cluster_peers_up': 1,
    'cluster_peer_states': {'10.0.0.1:11211': 'up', '10.0.0.2:11211': 'down'}}


def test_the_cluster_counters_are_prometheus_metrics():
    from cachefs.metrics import LATENCY_BUCKETS, collect_families
    families = {f.name: f for f in collect_families(dict(CLUSTER_STATS), {}, LATENCY_BUCKETS)}
    assert families['cachefs_cluster_hits'].samples[0].value == 7
    assert families['cachefs_cluster_refused_blocks'].samples[0].value == 1
    assert families['cachefs_cluster_wait_timeouts'].samples[0].value == 1
    assert families['cachefs_cluster_peers_up'].samples[0].value == 1
    assert {(s.labels['peer'], s.value) for s in families['cachefs_cluster_peer_up'].samples} \
        == {('10.0.0.1:11211', 1.0), ('10.0.0.2:11211', 0.0)}
    plain = {f.name for f in collect_families({}, {}, LATENCY_BUCKETS)}
    assert not any('cluster' in name for name in plain)       # off: no cluster metric at all


def test_cachefs_stats_shows_the_cluster_lines_only_when_it_is_on():
    from cachefs.cli import format_stats
    base = {'source': 's3://b/p', 'pid': 1, 'uptime_s': 1.0, 'files': 1, 'dataset_bytes': 1,
            'hits': 0, 'misses': 0, 'memory_hits': 0, 'disk_hits': 0, 'shared_fetches': 0,
            'store_bytes': 0, 'store_requests': 0, 'store_retries': 0, 'store_errors': 0,
            'prefetches': 0, 'prefetched_bytes': 0, 'memory_used_bytes': 0,
            'memory_capacity_bytes': 1, 'memory_blocks': 0, 'memory_evictions': 0,
            'disk_capacity_bytes': 0}
    assert not [line for line in format_stats(base) if 'cluster' in line]
    lines = format_stats({**base, **CLUSTER_STATS})
    assert 'cluster tier    7 hits (7.0 MiB), 3 misses, 4 skipped, 2 errors (1 timeouts, ' \
        "1 refused blocks), 2 waited for another node's fetch (1 in vain)" in lines
    assert 'cluster peers   1 of 2 up; down: 10.0.0.2:11211' in lines


async def _lease_answer(answer):
    client, server = trio.testing.memory_stream_pair()
    connection = MetaConnection(client)

    async def peer():
        request = b''
        while b'\r\n' not in request:
            request += await server.receive_some(4096)
        assert b' N10 ' in request
        opaque = int(request.split(b' O')[1].split(b'\r\n')[0])
        await server.send_all(answer % opaque)
        await server.aclose()
    result: list = []

    async def ask():
        try:
            result.append(await connection.get(KEY, 100, lease=10))
        except (PeerFailure, BlockRefused) as exc:
            result.append(type(exc))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            nursery.start_soon(ask)
    return result[0]


@pytest.mark.parametrize('answer, expected', [
    (b'VA 0 W O%d\r\n\r\n', WON),
    (b'VA 0 O%d W\r\n\r\n', WON),
    (b'VA 0 Z O%d\r\n\r\n', BUSY),
    (b'VA 0 W Z O%d\r\n\r\n', WON),
    (b'VA 0 W O%d\r\n', PeerFailure),            # the empty value's CRLF missing
    (b'VA 0 W O%d\r\nXY', PeerFailure),
    (b'VA 0 O%d\r\n\r\n', BlockRefused),         # an empty value without a lease is no block
    (b'VA 5 W O%d\r\nhello\r\n', BlockRefused),
])
async def test_a_lease_answer_is_won_or_busy_and_nothing_else(answer, expected):
    assert await _lease_answer(answer) == expected
