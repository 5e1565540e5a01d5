"""Object reads on the trio thread (`ufs/s3_trio.py`) against the loopback SeaweedFS: the same
bytes as the source for every edge-case key and random ranges, over plain HTTP and over HTTPS
with the client's CA bundle; the same store errors; a pooled connection the store closed is
replaced; a client that talks through a proxy keeps the threaded path."""

import os
import random
import socket

import pytest

from cachefs.ufs.errors import (AccessDenied, EndpointUnreachable, ObjectChanged,
                                ObjectNotFound, TransientError)
from cachefs.ufs.s3 import S3Store

from conftest import S3_BUCKET
from support.tls_relay import TlsRelay, make_certificate


def open_store(endpoint, prefix='data/'):
    return S3Store(S3_BUCKET, prefix, endpoint_url=endpoint)


def count_threaded_reads(store):
    """Object reads sent through botocore's HTTP session (the worker-thread paths)."""
    sent = []
    session = store._getter._http
    send = session.send

    def counting_send(request):
        if 'Range' in request.headers:
            sent.append(request)
        return send(request)
    session.send = counting_send
    return sent


async def check_every_object(store, source_root, ranges_per_object=1):
    rng = random.Random(5)
    objects = [o for o in store.list_objects() if o.size and not o.key.endswith('/')]
    assert len(objects) >= 300
    for obj in objects:
        source = (source_root / obj.key).read_bytes()
        assert await store.read_async(obj.key, obj.etag, 0, obj.size) == source, obj.key
        for _ in range(ranges_per_object):
            offset = rng.randrange(obj.size)
            length = rng.randint(1, obj.size - offset)
            data = await store.read_async(obj.key, obj.etag, offset, length)
            assert data == source[offset:offset + length], (obj.key, offset, length)


async def test_every_object_and_range_matches_the_source_on_the_trio_path(seaweed, s3_env):
    store = open_store(seaweed.endpoint)
    assert store._trio_getter is not None
    sent = count_threaded_reads(store)
    await check_every_object(store, s3_env.local_root, ranges_per_object=2)
    assert store._trio_getter is not None, 'the trio path was abandoned'
    assert sent == []
    assert 0 < len(store._trio_getter._idle) <= 1     # one request at a time: one connection


async def test_error_answers_on_the_trio_path_become_the_same_store_errors(seaweed, s3_env,
                                                                           monkeypatch):
    store = open_store(seaweed.endpoint)
    obj = next(o for o in store.list_objects() if o.size)
    with pytest.raises(ObjectChanged, match='PreconditionFailed'):
        await store.read_async(obj.key, '0' * 32, 0, 1)
    with pytest.raises(ObjectNotFound, match='NoSuchKey'):
        await store.read_async('no/such/object', obj.etag, 0, 1)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'not-the-secret')
    with pytest.raises(AccessDenied) as denied:
        await open_store(seaweed.endpoint).read_async(obj.key, obj.etag, 0, 1)
    assert 'not-the-secret' not in str(denied.value)
    assert store._trio_getter is not None


async def test_a_pooled_connection_the_store_closed_is_replaced(seaweed, s3_env):
    store = open_store(seaweed.endpoint)
    obj = next(o for o in store.list_objects() if o.size > 100)
    source = (s3_env.local_root / obj.key).read_bytes()
    assert await store.read_async(obj.key, obj.etag, 0, 100) == source[:100]
    (pooled,) = store._trio_getter._idle
    # As if the store dropped the idle connection (shut down behind trio's back).
    with socket.socket(fileno=os.dup(pooled.socket.fileno())) as raw:
        raw.shutdown(socket.SHUT_RDWR)
    assert await store.read_async(obj.key, obj.etag, 0, obj.size) == source
    assert store._trio_getter._idle and store._trio_getter._idle[0] is not pooled


async def test_https_reads_verify_the_store_certificate_with_the_clients_ca_bundle(
        seaweed, s3_env, tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path)
    with TlsRelay(seaweed.s3_port, cert, key) as relay:
        monkeypatch.setenv('AWS_CA_BUNDLE', str(cert))
        store = open_store(relay.endpoint)
        assert store._trio_getter is not None
        sent = count_threaded_reads(store)
        await check_every_object(store, s3_env.local_root)
        assert sent == []
        # A client that trusts another CA refuses the relay's certificate, on this path too.
        (tmp_path / 'other').mkdir()
        other_cert, _ = make_certificate(tmp_path / 'other')
        monkeypatch.setenv('AWS_CA_BUNDLE', str(other_cert))
        distrustful = open_store(relay.endpoint)
        with pytest.raises(EndpointUnreachable, match='TLS'):
            await distrustful.read_async('any', 'etag', 0, 1)


def test_a_client_behind_a_proxy_keeps_the_threaded_path(seaweed, s3_env, monkeypatch):
    monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:9')
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    store = open_store(seaweed.endpoint)
    assert store._getter is not None and store._trio_getter is None


@pytest.mark.parametrize('path', ['trio', 'threads'])
async def test_an_answer_for_another_range_of_the_same_length_is_refused(seaweed, s3_env,
                                                                         monkeypatch, path):
    """A store (or a cache in between) that answers 206 for another range than the one asked,
    with the right length, would hand over the wrong bytes: both read paths check
    Content-Range and fail the attempt instead (it is retried, then EIO)."""
    store = open_store(seaweed.endpoint)
    obj = next(o for o in store.list_objects() if o.size > 100)
    getter = store._trio_getter if path == 'trio' else store._getter
    method = '_signed' if path == 'trio' else '_send'
    original = getattr(getter, method)

    def shifted(key_or_url, headers):
        headers = dict(headers, Range='bytes=1-10')       # the store answers another range
        return original(key_or_url, headers)
    monkeypatch.setattr(getter, method, shifted)
    with pytest.raises(TransientError, match='Content-Range'):
        if path == 'trio':
            await store.read_async(obj.key, obj.etag, 0, 10)
        else:
            store.read(obj.key, obj.etag, 0, 10)
