"""The lean S3 read path (`ufs/s3_get.py`) against the loopback SeaweedFS: it returns the same
bytes botocore's `get_object` would, for every key the edge-case tree has (unicode, spaces,
`+ % # & = , ; ~ '`), maps the store's error answers to the same errors, and hands anything it
does not know to `get_object`."""

import random

import pytest

from cachefs.ufs.errors import AccessDenied, ObjectChanged, ObjectNotFound, TransientError
from cachefs.ufs.s3 import S3Store

from conftest import S3_BUCKET


@pytest.fixture
def s3_env(s3_source, monkeypatch):
    for name, value in s3_source.env.items():
        monkeypatch.setenv(name, value)
    return s3_source


def open_store(seaweed, prefix='data/'):
    return S3Store(S3_BUCKET, prefix, endpoint_url=seaweed.endpoint)


def count_sdk_reads(store):
    calls = []
    store.client.meta.events.register('before-call.s3.GetObject', lambda **kw: calls.append(1))
    return calls


def test_every_object_and_range_matches_the_source_without_get_object(seaweed, s3_env):
    store = open_store(seaweed)
    sdk_reads = count_sdk_reads(store)
    rng = random.Random(3)
    objects = [o for o in store.list_objects() if o.size and not o.key.endswith('/')]
    assert len(objects) >= 300
    for obj in objects:
        source = (s3_env.local_root / obj.key).read_bytes()
        assert store.read(obj.key, obj.etag, 0, obj.size) == source, obj.key
        offset = rng.randrange(obj.size)
        length = rng.randint(1, obj.size - offset)
        assert store.read(obj.key, obj.etag, offset, length) == source[offset:offset + length]
    assert store._getter is not None, 'the lean path was abandoned'
    assert sdk_reads == []


def test_error_answers_become_the_same_store_errors(seaweed, s3_env, monkeypatch):
    store = open_store(seaweed)
    obj = next(o for o in store.list_objects() if o.size)
    with pytest.raises(ObjectChanged, match='PreconditionFailed'):
        store.read(obj.key, '0' * 32, 0, 1)
    with pytest.raises(ObjectNotFound, match='NoSuchKey'):
        store.read('no/such/object', obj.etag, 0, 1)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'not-the-secret')
    with pytest.raises(AccessDenied) as denied:
        open_store(seaweed).read(obj.key, obj.etag, 0, 1)
    assert 'not-the-secret' not in str(denied.value)
    assert store._getter is not None


class _Answer:
    """An HTTP answer the lean path has no rule for (a redirect), from a stand-in transport."""
    status_code = 301

    class raw:
        @staticmethod
        def read(amount=None):
            return b'<Error><Code>PermanentRedirect</Code></Error>'

        @staticmethod
        def release_conn():
            pass


class _RedirectingSession:
    def __init__(self):
        self.sent = 0

    def send(self, request):
        self.sent += 1
        return _Answer()


def test_an_answer_it_does_not_know_goes_to_get_object_from_then_on(seaweed, s3_env):
    store = open_store(seaweed)
    sdk_reads = count_sdk_reads(store)
    transport = store._getter._http = _RedirectingSession()
    obj = next(o for o in store.list_objects() if o.size > 10)
    source = (s3_env.local_root / obj.key).read_bytes()
    assert store.read(obj.key, obj.etag, 2, 8) == source[2:10]
    assert store.read(obj.key, obj.etag, 0, obj.size) == source
    assert transport.sent == 1 and len(sdk_reads) == 2
    assert store._getter is None


def test_public_buckets_get_unsigned_requests_at_botocore_urls(monkeypatch):
    """--no-sign-request: the lean path sends no Authorization header; the object URL follows
    the client's addressing style (no network needed to build either)."""
    for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_PROFILE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', '/dev/null')
    monkeypatch.setenv('AWS_CONFIG_FILE', '/dev/null')
    sent = []

    class Recorder:
        def send(self, request):
            sent.append(request)
            raise ConnectionRefusedError('not sending')

    path_style = S3Store('public-bucket', 'p/', endpoint_url='http://127.0.0.1:9',
                         path_style=True, no_sign_request=True)
    path_style._getter._http = Recorder()
    with pytest.raises(TransientError):
        path_style.read('a b/c~d+e.bin', 'etag', 0, 10)
    request = sent[-1]
    assert request.url == 'http://127.0.0.1:9/public-bucket/p/a%20b/c~d%2Be.bin'
    assert 'Authorization' not in request.headers
    assert request.headers['Range'] == 'bytes=0-9'
    assert request.headers['If-Match'] == '"etag"'
