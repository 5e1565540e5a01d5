"""The lean S3 read and listing paths (`ufs/s3_get.py`, `ufs/s3_list.py`) against the loopback
SeaweedFS: they return the same bytes and keys botocore's `get_object` and `list_objects_v2`
would, for every key the edge-case tree has (unicode, spaces, `+ % # & = , ; ~ '`), map the
store's error answers to the same errors, and hand anything they do not know to the SDK."""

import random

import pytest

from cachefs.ufs.errors import (AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound,
                                TransientError)
from cachefs.ufs.s3 import S3Store
from cachefs.ufs.s3_list import parse_page

from conftest import S3_BUCKET


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

        @staticmethod
        def close():
            pass


class _RedirectingSession:
    def __init__(self):
        self.sent = 0

    def send(self, request):
        self.sent += 1
        return _Answer()


def test_an_answer_it_does_not_know_goes_to_get_object_for_a_while(seaweed, s3_env):
    store = open_store(seaweed)
    sdk_reads = count_sdk_reads(store)
    transport = store._getter._http = _RedirectingSession()
    obj = next(o for o in store.list_objects() if o.size > 10)
    source = (s3_env.local_root / obj.key).read_bytes()
    assert store.read(obj.key, obj.etag, 2, 8) == source[2:10]
    assert store.read(obj.key, obj.etag, 0, obj.size) == source
    assert transport.sent == 1 and len(sdk_reads) == 2
    assert store._sdk_reads.taken == 1      # a detour, not for good (tests/test_store_slots.py)


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


# -- listings (`ufs/s3_list.py`) --

def sdk_listing(store, page_size):
    paginator = store.client.get_paginator('list_objects_v2')
    return [(item['Key'], item['Size'], item['ETag'].strip('"'),
             int(item['LastModified'].timestamp() * 1e9))
            for page in paginator.paginate(Bucket=store.bucket, Prefix=store.prefix,
                                           PaginationConfig={'PageSize': page_size})
            for item in page.get('Contents', ())]


def lean_listing(lister, prefix):
    objects, token = lister.page(prefix)
    while token is not None:
        page, token = lister.page(prefix, token)
        objects += page
    return objects


def count_sdk_listings(store):
    calls = []
    store.client.meta.events.register('before-call.s3.ListObjectsV2',
                                      lambda **kw: calls.append(1))
    return calls


def test_listing_pages_match_botocore_for_every_edge_case_key(seaweed, s3_env):
    """Pages of 7 keys, so that continuation tokens are used many times; keys with spaces,
    unicode, '+ % # & = ; ~' come back url-encoded and are decoded as botocore decodes them."""
    store = open_store(seaweed)
    sdk_listings = count_sdk_listings(store)
    store._lister.page_keys = 7
    lean = lean_listing(store._lister, store.prefix)
    listed = {o.key for o in store.list_objects()}
    assert sdk_listings == [] and store._lister is not None
    assert len(lean) >= 300
    assert lean == sdk_listing(store, 7)
    assert listed == {key[len(store.prefix):] for key, *_ in lean}


def test_listing_errors_become_the_same_store_errors(seaweed, s3_env, monkeypatch):
    with pytest.raises(BucketNotFound):
        list(S3Store('no-such-bucket-here', '', endpoint_url=seaweed.endpoint).list_objects())
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'not-the-secret')
    with pytest.raises(AccessDenied) as denied:
        list(open_store(seaweed).list_objects())
    assert 'not-the-secret' not in str(denied.value)


def test_a_listing_answer_it_does_not_know_continues_through_the_sdk(seaweed, s3_env):
    """The first page comes the lean way, the second answer is a redirect: the listing goes on
    from the same page through list_objects_v2, complete and without a duplicate."""
    store = open_store(seaweed)
    store.list_fan_out = 1      # one stream of pages (test_parallel_listing: the fan-out)
    expected = [o.key for o in store.list_objects()]
    sdk_listings = count_sdk_listings(store)
    lister = store._lister
    lister.page_keys = 50
    lean_http = lister._http
    transport = _RedirectingSession()

    class FirstPageOnly:
        sent = 0

        def send(self, request):
            self.sent += 1
            return (lean_http if self.sent == 1 else transport).send(request)
    lister._http = FirstPageOnly()
    store.client.meta.events.register(   # the SDK's pages as small, to check the token hand-over
        'before-parameter-build.s3.ListObjectsV2',
        lambda params, **kw: params.setdefault('MaxKeys', 50))
    listed = [o.key for o in store.list_objects()]
    assert listed == expected
    assert transport.sent == 1 and len(sdk_listings) == -(-(len(expected) - 50) // 50)
    assert store._sdk_lists.taken == 1


def test_listing_pages_parse_without_a_namespace_and_refuse_a_truncated_page_without_token():
    page = (b'<ListBucketResult><IsTruncated>true</IsTruncated><EncodingType>url</EncodingType>'
            b'<NextContinuationToken>t&amp;1</NextContinuationToken>'
            b'<Contents><Key>a+b%2Bc%E2%82%AC</Key><Size>12</Size><ETag>&quot;e1&quot;</ETag>'
            b'<LastModified>2026-11-26T10:00:00.500Z</LastModified></Contents>'
            b'</ListBucketResult>')
    objects, token = parse_page(page)
    assert token == 't&1'
    assert objects == [('a b+c\u20ac', 12, 'e1', 1795687200_500000000)]
    with pytest.raises(TransientError):
        parse_page(page.replace(b'<NextContinuationToken>t&amp;1</NextContinuationToken>', b''))
    last_page = page.replace(b'<IsTruncated>true', b'<IsTruncated>false')
    assert parse_page(last_page)[1] is None
