"""OSS object reads on the trio thread (`ufs/oss_trio.py`, signed by `ufs/oss_sign.py`) against
the OSS-protocol test server: the same bytes as the source for every edge-case key, in-process
and through a mount, with no read through oss2; V1 signatures equal to oss2's for any key;
STS tokens; oss2 kept where the signatures differ; faults retried without a wrong byte; an
idle connection the server closed replaced; error answers mapped as oss2's are; hostile answers
refused."""

import hashlib
import logging
import random
import time

import oss2
import oss2.http
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.ufs.async_store import AsyncStore
from cachefs.ufs.errors import (AccessDenied, EndpointUnreachable, ObjectChanged, ObjectNotFound,
                                StoreError, TransientError)
from cachefs.ufs.oss import OssStore
from cachefs.ufs.oss_sign import OssSigner

from conftest import OSS_BUCKET, OSS_KEY_ID, OSS_SECRET, assert_tree_matches
from support.faults import FaultProxy, FirstTry, SeededMix
from support.oss_server import OssServer
from support.scripted_http import Reply, ScriptedServer
from support.tls_relay import TlsRelay, make_certificate

OSS2_AGENT = 'aliyun-sdk-python'
STS_ID, STS_SECRET, STS_TOKEN = 'STS.cachefs-test', 'sts-secret-9Kq', 'CAIS+token/with=odd%chars'


@pytest.fixture
def oss_env(oss_source, monkeypatch):
    """The OSS source, with its credentials in this process's environment."""
    for name, value in oss_source.env.items():
        if name.startswith('OSS_'):
            monkeypatch.setenv(name, value)
    for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy'):
        monkeypatch.delenv(name, raising=False)
    return oss_source


def open_store(endpoint, prefix='data/'):
    return OssStore(OSS_BUCKET, prefix, endpoint_url=endpoint, request_timeout=10)


def count_oss2_reads(store):
    """Calls of oss2's get_object (the worker-thread path) on `store`."""
    calls = []
    get_object = store.bucket.get_object

    def counting(*args, **kwargs):
        calls.append(args)
        return get_object(*args, **kwargs)
    store.bucket.get_object = counting
    return calls


def forget_connections(store):
    """Pooled connections belong to one trio run (closed inside the next one)."""
    for connection in store._trio_getter._idle:
        connection.close()
    store._trio_getter._idle.clear()


def oss2_signature(auth, bucket, key, headers):
    """The headers oss2's `auth` adds to a GET of `key`."""
    request = oss2.http.Request('GET', f'http://127.0.0.1/{bucket}/x', headers=dict(headers))
    auth._sign_request(request, bucket, key)
    return {name.lower(): value for name, value in request.headers.items()
            if name.lower() in ('date', 'authorization', 'x-oss-security-token')}


def our_signature(signer, key, headers, date):
    return {name.lower(): value for name, value in signer.sign(key, headers, date=date).items()
            if name.lower() in ('date', 'authorization', 'x-oss-security-token')}


HEADERS = {'Range': 'bytes=0-9', 'If-Match': '"5D41402ABC4B2A76B9719D911017C592"',
           'x-oss-range-behavior': 'standard'}
ODD_CHARACTERS = st.sampled_from(list(' +%~?#&=/\\\'"*!@$^()[]{}|;:,<>`é中日ß🙂\t') +
                                 ['%20', '%2F', '..', '//'])
KEYS = st.lists(st.one_of(ODD_CHARACTERS, st.characters(blacklist_categories=('Cs',))),
                min_size=1, max_size=40).map(''.join)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(key=KEYS, sts=st.booleans())
def test_our_v1_signature_equals_oss2s_for_any_key(key, sts):
    if sts:
        auth, signer = (oss2.StsAuth(STS_ID, STS_SECRET, STS_TOKEN),
                        OssSigner('bkt', STS_ID, STS_SECRET, STS_TOKEN))
    else:
        auth, signer = oss2.Auth(OSS_KEY_ID, OSS_SECRET), OssSigner('bkt', OSS_KEY_ID, OSS_SECRET)
    theirs = oss2_signature(auth, 'bkt', key, HEADERS)
    assert our_signature(signer, key, HEADERS, theirs['date']) == theirs


def test_the_signers_date_is_the_http_date_of_now():
    signed = OssSigner('bkt', 'id', 'secret').sign('k', HEADERS)
    assert abs(oss2.utils.http_to_unixtime(signed['Date']) - time.time()) <= 2


async def test_every_edge_case_object_and_range_is_byte_exact_on_the_lean_path(oss_env):
    store = open_store(oss_endpoint(oss_env))
    assert store.read_paths() == ('oss2', 'trio')
    oss2_reads = count_oss2_reads(store)
    rng = random.Random(3)
    objects = [o for o in store.list_objects() if o.size and not o.key.endswith('/')]
    assert len(objects) >= 300
    for obj in objects:
        data = await store.read_async(obj.key, obj.etag, 0, obj.size)
        assert (obj.size, sha256_of_bytes(data)) == oss_env.manifest[obj.key], obj.key
        offset = rng.randrange(obj.size)
        length = rng.randint(1, obj.size - offset)
        source = (oss_env.local_root / obj.key).read_bytes()
        assert await store.read_async(obj.key, obj.etag, offset, length) == \
            source[offset:offset + length], (obj.key, offset, length)
    assert oss2_reads == []
    assert 0 < len(store._trio_getter._idle) <= 1       # one request at a time: one connection


def oss_endpoint(source):
    return source.args[source.args.index('--endpoint-url') + 1]


def sha256_of_bytes(data):
    return hashlib.sha256(data).hexdigest()


@pytest.mark.fuse
def test_a_mount_reads_every_edge_case_file_byte_exact_through_the_lean_path(
        mounter, oss_source, oss_server):
    before = len(oss_server.requests)
    mounted = mounter.mount(oss_source)
    assert_tree_matches(mounted.path, oss_source.manifest)
    reads = [r for r in oss_server.requests[before:] if r.method == 'GET' and 'range' in r.headers]
    assert len(reads) >= len([size for size, _ in oss_source.manifest.values() if size])
    agents = {r.headers.get('user-agent', '') for r in reads}
    assert not any(agent.startswith(OSS2_AGENT) for agent in agents), agents


async def test_sts_credentials_read_on_the_lean_path_with_their_token(tmp_path, monkeypatch):
    with OssServer(str(tmp_path / 'oss'), {}, sts_credentials=[(STS_ID, STS_SECRET, STS_TOKEN)]) \
            as server:
        server.create_bucket(OSS_BUCKET)
        data = random.Random(1).randbytes(5000)
        server.put_object(OSS_BUCKET, 'data/a b+c%d.bin', data)
        monkeypatch.setenv('OSS_ACCESS_KEY_ID', STS_ID)
        monkeypatch.setenv('OSS_ACCESS_KEY_SECRET', STS_SECRET)
        monkeypatch.setenv('OSS_SESSION_TOKEN', STS_TOKEN)
        store = open_store(server.endpoint)
        assert store.read_paths() == ('oss2', 'trio')
        oss2_reads = count_oss2_reads(store)
        (obj,) = store.list_objects()
        assert await store.read_async(obj.key, obj.etag, 10, 4000) == data[10:4010]
        assert oss2_reads == []
        assert server.requests[-1].headers['x-oss-security-token'] == STS_TOKEN
        monkeypatch.setenv('OSS_SESSION_TOKEN', 'not-the-token')
        with pytest.raises(AccessDenied, match='InvalidSecurityToken') as denied:
            await open_store(server.endpoint).read_async(obj.key, obj.etag, 0, 1)
        assert 'not-the-token' not in str(denied.value)


async def test_a_signature_that_differs_from_oss2s_keeps_oss2_for_reads(oss_env, monkeypatch,
                                                                          caplog):
    sign = OssSigner.sign

    def other(self, key, headers, date=None):      # as if oss2 had come to sign another way
        return sign(self, key, dict(headers, **{'x-oss-extra': '1'}), date)
    monkeypatch.setattr(OssSigner, 'sign', other)
    with caplog.at_level(logging.INFO, logger='cachefs.ufs.oss'):
        store = open_store(oss_endpoint(oss_env))
    assert store.read_paths() == ('oss2',)
    assert any('signature differs' in record.getMessage() for record in caplog.records)
    obj = next(o for o in store.list_objects() if o.size > 100)
    assert await store.read_async(obj.key, obj.etag, 0, 100) is None
    oss2_reads = count_oss2_reads(store)
    source = (oss_env.local_root / obj.key).read_bytes()
    assert bytes(await AsyncStore(store).read(obj.key, obj.etag, 0, 100)) == source[:100]
    assert len(oss2_reads) == 1


async def test_https_reads_verify_the_server_certificate_with_requests_ca_bundle(
        oss_env, oss_server, tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path)
    with TlsRelay(oss_server.port, cert, key) as relay:
        monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(cert))
        store = open_store(relay.endpoint)
        assert store.read_paths() == ('oss2', 'trio')
        oss2_reads = count_oss2_reads(store)
        objects = [o for o in store.list_objects() if o.size][:20]
        for obj in objects:
            data = await store.read_async(obj.key, obj.etag, 0, obj.size)
            assert (obj.size, sha256_of_bytes(data)) == oss_env.manifest[obj.key], obj.key
        assert oss2_reads == []
        # A client that trusts another CA refuses the relay's certificate, on this path too.
        (tmp_path / 'other').mkdir()
        other_cert, _ = make_certificate(tmp_path / 'other')
        monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(other_cert))
        with pytest.raises(EndpointUnreachable, match='TLS'):
            await open_store(relay.endpoint).read_async(objects[0].key, objects[0].etag, 0, 1)
        # Closed while the relay is up, so that its threads end before it closes their sockets
        # (a socket it closed under a thread has a number a later test's connection may get).
        forget_connections(store)
        await trio.sleep(0.3)


def test_a_ca_bundle_that_cannot_be_loaded_keeps_oss2_and_a_folder_of_certificates_is_taken(
        tmp_path, monkeypatch):
    monkeypatch.setenv('OSS_ACCESS_KEY_ID', 'id')
    monkeypatch.setenv('OSS_ACCESS_KEY_SECRET', 'secret')
    for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy'):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / 'empty.pem').write_bytes(b'')
    for bundle, paths in ((tmp_path / 'absent.pem', ('oss2',)), (tmp_path / 'empty.pem', ('oss2',)),
                          (tmp_path, ('oss2', 'trio'))):      # requests takes a folder too
        monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(bundle))
        assert OssStore('bkt', '', 'https://127.0.0.1:9').read_paths() == paths, bundle


def test_a_client_behind_a_proxy_keeps_oss2(oss_env, monkeypatch):
    monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:9')
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    assert open_store(oss_endpoint(oss_env)).read_paths() == ('oss2',)


def test_the_object_url_is_oss2s_path_or_virtual_host_style():
    cases = {('http://127.0.0.1:9000', False): ('/bkt/', '127.0.0.1:9000'),
             ('http://localhost:9000', False): ('/bkt/', 'localhost:9000'),
             ('oss-cn-hangzhou.aliyuncs.com', False): ('/', 'bkt.oss-cn-hangzhou.aliyuncs.com'),
             ('https://oss-cn-hangzhou.aliyuncs.com', True):
                 ('/bkt/', 'oss-cn-hangzhou.aliyuncs.com')}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('OSS_ACCESS_KEY_ID', 'id')
        patch.setenv('OSS_ACCESS_KEY_SECRET', 'secret')
        for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy'):
            patch.delenv(name, raising=False)
        for (endpoint, path_style), (path, host) in cases.items():
            getter = OssStore('bkt', '', endpoint, path_style=path_style)._trio_getter
            assert (getter._path_prefix, getter._host_header) == (path, host), endpoint
            request = getter._signed('a/b c+d', getter._range_headers('e' * 32, 0, 1))
            assert request.startswith(f'GET {path}a%2Fb%20c%2Bd HTTP/1.1\r\n'
                                      f'Host: {host}\r\n'.encode())


async def test_error_answers_become_the_same_store_errors_as_oss2s(private_oss_source,
                                                                   monkeypatch):
    source = private_oss_source
    server = source.extra['server']
    for name, value in source.env.items():
        if name.startswith('OSS_'):
            monkeypatch.setenv(name, value)
    store = open_store(server.endpoint)
    obj = next(o for o in store.list_objects() if o.size > 10)
    with pytest.raises(ObjectNotFound, match='NoSuchKey'):
        await store.read_async('no/such/object', obj.etag, 0, 1)
    # The object is replaced after it was listed: If-Match fails, the block is never served.
    server.put_object(OSS_BUCKET, 'data/' + obj.key, b'another version of the object')
    with pytest.raises(ObjectChanged, match='PreconditionFailed'):
        await store.read_async(obj.key, obj.etag, 0, 10)
    monkeypatch.setenv('OSS_ACCESS_KEY_SECRET', 'not-the-secret')
    with pytest.raises(AccessDenied, match='SignatureDoesNotMatch') as denied:
        await open_store(server.endpoint).read_async(obj.key, obj.etag, 0, 1)
    assert 'not-the-secret' not in str(denied.value)
    assert store._threaded_reads.taken == 0


def test_faults_mid_body_are_retried_on_the_lean_path_without_a_wrong_byte(oss_env, oss_server):
    with FaultProxy('127.0.0.1', oss_server.port,
                    plan=SeededMix(11, 0.3, {'reset_mid_body': 2, 'truncated_body': 2,
                                             'short_range': 1, 'http_500': 1,
                                             'slowdown_503': 1})) as proxy:
        store = open_store(proxy.endpoint)
        oss2_reads = count_oss2_reads(store)
        objects = [o for o in store.list_objects() if o.size and not o.key.endswith('/')][:150]
        async_store = AsyncStore(store, max_concurrency=8, retry_timeout=20)

        async def main():
            async def check(obj):
                data = await async_store.read(obj.key, obj.etag, 0, obj.size)
                assert (obj.size, sha256_of_bytes(data)) == oss_env.manifest[obj.key], obj.key
            async with trio.open_nursery() as nursery:
                for obj in objects:
                    nursery.start_soon(check, obj)
        trio.run(main)
        assert proxy.faults_total() >= 10
        assert oss2_reads == []


def test_an_answer_the_lean_path_does_not_handle_is_read_through_oss2(oss_env, oss_server):
    with FaultProxy('127.0.0.1', oss_server.port, plan=FirstTry('http_400')) as proxy:
        store = open_store(proxy.endpoint)
        oss2_reads = count_oss2_reads(store)
        obj = next(o for o in store.list_objects() if o.size > 100)
        source = (oss_env.local_root / obj.key).read_bytes()
        data = trio.run(AsyncStore(store).read, obj.key, obj.etag, 0, 100)
        assert bytes(data) == source[:100]
        assert len(oss2_reads) == 1 and store._threaded_reads.taken == 1


def test_an_idle_connection_the_server_closed_is_replaced(tmp_path, monkeypatch):
    with OssServer(str(tmp_path / 'oss'), {OSS_KEY_ID: OSS_SECRET}, idle_timeout=0.2) as server:
        server.create_bucket(OSS_BUCKET)
        data = random.Random(2).randbytes(3000)
        server.put_object(OSS_BUCKET, 'data/obj', data)
        monkeypatch.setenv('OSS_ACCESS_KEY_ID', OSS_KEY_ID)
        monkeypatch.setenv('OSS_ACCESS_KEY_SECRET', OSS_SECRET)
        store = open_store(server.endpoint)
        (obj,) = store.list_objects()
        getter = store._trio_getter

        async def main(seen_closed):
            forget_connections(store)
            assert await store.read_async('obj', obj.etag, 0, 1000) == data[:1000]
            (pooled,) = getter._idle
            await trio.sleep(0.6)                   # the server closes it meanwhile
            if not seen_closed:     # its close not seen yet when the request goes out
                monkeypatch.setattr(pooled, 'readable', lambda: False)
            before = server.request_count('GET')
            assert await store.read_async('obj', obj.etag, 1000, 2000) == data[1000:]
            assert server.request_count('GET') == before + 1
            assert getter._idle and getter._idle[0] is not pooled
        trio.run(main, True)
        trio.run(main, False)


OBJECT = bytes(range(100, 196))
ETAG = '6F1ED002AB5595859014EBF0951522D9'


def answer(status, headers, body):
    return b'\r\n'.join([status, *headers, b'', body])


def range_answer(offset, length, content_range=None, extra=b''):
    end = offset + length - 1
    content_range = content_range or b'bytes %d-%d/%d' % (offset, end, len(OBJECT))
    return answer(b'HTTP/1.1 206 Partial Content',
                  [b'Content-Range: ' + content_range, b'Content-Length: %d' % length,
                   b'ETag: "%s"' % ETAG.encode()], OBJECT[offset:end + 1] + extra)


@pytest.mark.parametrize('hostile', ['another_range', 'extra_bytes', 'whole_object'])
def test_hostile_answers_are_refused_on_the_lean_path(hostile, monkeypatch):
    replies = {
        'another_range': range_answer(10, 10, content_range=b'bytes 20-29/96'),
        'extra_bytes': range_answer(10, 10, extra=b'HTTP/1.1 206 Partial Content\r\n'),
        'whole_object': answer(b'HTTP/1.1 200 OK', [b'Content-Length: %d' % len(OBJECT),
                                                    b'ETag: "%s"' % ETAG.encode()], OBJECT),
    }
    errors = {'another_range': (TransientError, 'Content-Range'),
              'extra_bytes': (TransientError, 'past the end'),
              'whole_object': (StoreError, 'ignored the Range')}
    monkeypatch.setenv('OSS_ACCESS_KEY_ID', 'id')
    monkeypatch.setenv('OSS_ACCESS_KEY_SECRET', 'secret')
    with ScriptedServer(lambda _: Reply([replies[hostile]], close=False, hold=1.0)) as server:
        store = OssStore('bkt', '', server.endpoint)
        kind, message = errors[hostile]
        with pytest.raises(kind, match=message) as refused:
            trio.run(store.read_async, 'obj', ETAG, 10, 10)
        assert type(refused.value) is kind
        (request,) = server.requests
        assert b'x-oss-range-behavior: standard' in request and b'Range: bytes=10-19' in request
        assert store._trio_getter._idle == []       # the connection is not reused

