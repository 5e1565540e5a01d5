"""Checks that tests/support/oss_server.py behaves like Aliyun OSS for oss2.

The server is only useful if oss2 cannot tell it from the real service, so
everything here goes through oss2 (or raw HTTP where oss2 hides the detail
being checked: status lines, Content-Length, keep-alive).
"""

import base64
import hashlib
import http.client
import os
import sys
import threading
import time

import oss2
import pytest
import requests

sys.path.insert(0, os.path.dirname(__file__))

from support.oss_server import OssServer  # noqa: E402

AK, SK = 'test-ak', 'test-sk'
STS_AK, STS_SK, STS_TOKEN = 'STS.test-ak', 'sts-sk', 'sts-token-123'
BUCKET = 'cachefs-test'
PUBLIC = 'cachefs-public'
DOMAIN = 'oss.localhost'


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    srv = OssServer(str(tmp_path_factory.mktemp('oss')), {AK: SK},
                    sts_credentials=[(STS_AK, STS_SK, STS_TOKEN)], domain=DOMAIN)
    with srv:
        srv.create_bucket(BUCKET)
        srv.create_bucket(PUBLIC, acl='public-read')
        yield srv


@pytest.fixture
def bucket(server):
    server.reset_requests()
    return oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)


def md5_etag(data):
    return hashlib.md5(data).hexdigest().upper()


# --------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------

def test_put_get_head(server, bucket):
    data = b'hello, object storage'
    result = bucket.put_object('obj/plain.txt', data, headers={'x-oss-meta-color': 'blue'})
    assert result.etag == md5_etag(data)
    assert server.get_object(BUCKET, 'obj/plain.txt') == data

    got = bucket.get_object('obj/plain.txt')
    assert got.read() == data
    assert got.status == 200
    assert got.etag == md5_etag(data)
    assert got.object_type == 'Normal'
    assert got.content_type == 'text/plain'          # oss2 guesses it from the extension
    assert got.headers['x-oss-meta-color'] == 'blue'
    assert abs(got.last_modified - time.time()) < 60

    head = bucket.head_object('obj/plain.txt')
    assert head.content_length == len(data)
    assert head.etag == md5_etag(data)
    assert head.last_modified == got.last_modified

    meta = bucket.get_object_meta('obj/plain.txt')
    assert meta.content_length == len(data) and meta.etag == md5_etag(data)
    assert bucket.object_exists('obj/plain.txt')
    assert not bucket.object_exists('obj/missing.txt')


def test_ranges_follow_oss_rules(bucket):
    data = bytes(range(100))
    bucket.put_object('ranges.bin', data)

    def get(byte_range, standard=False):
        headers = {'x-oss-range-behavior': 'standard'} if standard else None
        result = bucket.get_object('ranges.bin', byte_range=byte_range, headers=headers)
        return result.status, result.read()

    assert get((10, 19)) == (206, data[10:20])
    assert get((90, None)) == (206, data[90:])
    assert get((None, 5)) == (206, data[-5:])                  # suffix: last 5 bytes
    # Out-of-range requests: OSS ignores them unless asked for RFC behaviour.
    assert get((50, 500)) == (200, data)
    assert get((50, 500), standard=True) == (206, data[50:])
    assert get((100, 200)) == (200, data)
    with pytest.raises(oss2.exceptions.ServerError) as err:
        get((100, 200), standard=True)
    assert (err.value.status, err.value.code) == (416, 'InvalidRange')


def test_large_object_streams_and_ranges(tmp_path, bucket):
    size = 20 * 1024 * 1024
    data = os.urandom(size)
    assert bucket.put_object('big/blob', data).etag == md5_etag(data)

    tail = bucket.get_object('big/blob', byte_range=(size - 4096, size - 1))
    assert tail.status == 206
    assert tail.headers['Content-Range'] == 'bytes %d-%d/%d' % (size - 4096, size - 1, size)
    assert tail.read() == data[-4096:]

    # A full download through oss2 also verifies x-oss-hash-crc64ecma when sent.
    target = tmp_path / 'blob'
    bucket.get_object_to_file('big/blob', str(target))
    assert hashlib.md5(target.read_bytes()).digest() == hashlib.md5(data).digest()


def test_chunked_upload_and_content_md5(bucket):
    data = [b'a' * 1000, b'b' * 10, b'c' * 70000]
    bucket.put_object('chunked', iter(data))     # requests sends Transfer-Encoding: chunked
    assert bucket.get_object('chunked').read() == b''.join(data)

    good = base64.b64encode(hashlib.md5(b'abc').digest()).decode()
    bucket.put_object('md5', b'abc', headers={'Content-MD5': good})
    with pytest.raises(oss2.exceptions.InvalidDigest):
        bucket.put_object('md5', b'abd', headers={'Content-MD5': good})
    assert bucket.get_object('md5').read() == b'abc'


def test_delete_object(bucket):
    bucket.put_object('doomed', b'x')
    bucket.delete_object('doomed')
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object('doomed')
    bucket.delete_object('doomed')                          # OSS: deleting nothing is fine


def test_conditional_get(bucket):
    etag = bucket.put_object('cond', b'v1').etag
    assert bucket.get_object('cond', headers={'If-Match': '"%s"' % etag}).read() == b'v1'
    with pytest.raises(oss2.exceptions.PreconditionFailed):
        bucket.get_object('cond', headers={'If-Match': '"0123456789ABCDEF0123456789ABCDEF"'})
    with pytest.raises(oss2.exceptions.NotModified):
        bucket.get_object('cond', headers={'If-None-Match': '"%s"' % etag})
    future = oss2.utils.http_date(int(time.time()) + 3600)
    with pytest.raises(oss2.exceptions.NotModified):
        bucket.get_object('cond', headers={'If-Modified-Since': future})


KEYS = ['中文/文件.txt', 'with space.txt', 'plus+sign', 'percent%41', 'emoji😀', 'q?mark',
        'hash#tag', 'amp&x=y', 'slash/in/the/middle', 'tilde~', 'Ωmega']


def test_awkward_keys_round_trip(bucket):
    for key in KEYS:
        bucket.put_object('odd/' + key, key.encode('utf-8'))
    for key in KEYS:
        assert bucket.get_object('odd/' + key).read() == key.encode('utf-8')
    listed = [o.key for o in oss2.ObjectIterator(bucket, prefix='odd/', max_keys=4)]
    # OSS orders keys by their UTF-8 bytes, not by code point or locale.
    assert listed == sorted(('odd/' + k for k in KEYS), key=lambda k: k.encode('utf-8'))
    listed_v2 = [o.key for o in oss2.ObjectIteratorV2(bucket, prefix='odd/', max_keys=3)]
    assert listed_v2 == listed


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------

TREE = ['tree/a.txt', 'tree/b/1', 'tree/b/2', 'tree/b/3', 'tree/c.txt', 'tree/d/1',
        'tree/d/e/2', 'tree/f', 'tree/g/', 'tree/g/h', 'tree/z.txt']


@pytest.fixture
def tree(server):
    for key in TREE:
        server.put_object(BUCKET, key, key.encode())
    return TREE


def expected_listing(keys, prefix, delimiter):
    objects, prefixes = [], []
    for key in sorted(keys):
        if not key.startswith(prefix):
            continue
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
            if key[:cut + 1] not in prefixes:
                prefixes.append(key[:cut + 1])
        else:
            objects.append(key)
    return objects, prefixes


@pytest.mark.parametrize('iterator', [oss2.ObjectIterator, oss2.ObjectIteratorV2])
@pytest.mark.parametrize('prefix,delimiter', [('tree/', '/'), ('tree/', ''), ('tree/d', '/'),
                                              ('tree/b/', '/'), ('nothing/', '/')])
@pytest.mark.parametrize('max_keys', [1, 2, 3, 100])
def test_paginated_listing(bucket, tree, iterator, prefix, delimiter, max_keys):
    items = list(iterator(bucket, prefix=prefix, delimiter=delimiter, max_keys=max_keys))
    objects = [i.key for i in items if not i.is_prefix()]
    prefixes = [i.key for i in items if i.is_prefix()]
    assert (objects, prefixes) == expected_listing(tree, prefix, delimiter)
    for item in items:
        if not item.is_prefix():
            assert item.size == len(item.key) and item.etag == md5_etag(item.key.encode())
            assert item.type == 'Normal' and item.storage_class == 'Standard'


def test_listing_page_shape(bucket, tree):
    page = bucket.list_objects(prefix='tree/', delimiter='/', max_keys=3)
    assert page.is_truncated
    # a.txt, b/ and c.txt fill the page; NextMarker is the last entry returned.
    assert [o.key for o in page.object_list] == ['tree/a.txt', 'tree/c.txt']
    assert page.prefix_list == ['tree/b/']
    assert page.next_marker == 'tree/c.txt'
    assert page.object_list[0].owner.id == OssServer.owner_id

    page = bucket.list_objects(prefix='tree/', delimiter='/', marker='tree/b/', max_keys=100)
    assert [o.key for o in page.object_list][:1] == ['tree/c.txt']   # b/ is not repeated
    assert not page.is_truncated

    v2 = bucket.list_objects_v2(prefix='tree/', max_keys=2, fetch_owner=False)
    assert v2.is_truncated and v2.next_continuation_token
    assert v2.object_list[0].owner is None
    after = bucket.list_objects_v2(prefix='tree/', start_after='tree/f', max_keys=100)
    assert [o.key for o in after.object_list] == ['tree/g/', 'tree/g/h', 'tree/z.txt']
    with pytest.raises(oss2.exceptions.ServerError) as err:
        bucket.list_objects(max_keys=1001)
    assert err.value.code == 'InvalidArgument'


# --------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------

def test_bucket_info(server, bucket):
    info = bucket.get_bucket_info()
    assert info.name == BUCKET
    assert info.location == 'oss-cn-hangzhou'
    assert info.storage_class == 'Standard'
    assert info.acl.grant == 'private'
    assert info.owner.id == OssServer.owner_id
    assert info.creation_date.endswith('.000Z')
    assert bucket.get_bucket_location().location == 'oss-cn-hangzhou'


def test_bucket_lifecycle_via_api(server):
    auth = oss2.Auth(AK, SK)
    fresh = oss2.Bucket(auth, server.endpoint, 'made-by-api')
    fresh.create_bucket(oss2.BUCKET_ACL_PUBLIC_READ)
    fresh.create_bucket(oss2.BUCKET_ACL_PRIVATE)     # owner re-creating: succeeds, ACL updated
    assert fresh.get_bucket_acl().acl == 'private'
    names = [b.name for b in oss2.BucketIterator(oss2.Service(auth, server.endpoint))]
    assert 'made-by-api' in names and BUCKET in names
    fresh.put_object('k', b'v')
    with pytest.raises(oss2.exceptions.BucketNotEmpty):
        fresh.delete_bucket()
    fresh.delete_object('k')
    fresh.delete_bucket()
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        fresh.get_bucket_info()
    # oss2 refuses bad names client-side, so sign a raw request to see the server's answer.
    req = oss2.http.Request('PUT', server.endpoint + '/Bad_Name/')
    auth._sign_request(req, 'Bad_Name', '')
    resp = requests.put(req.url, headers={k: v for k, v in req.headers.items() if v is not None})
    assert resp.status_code == 400 and b'<Code>InvalidBucketName</Code>' in resp.content


# --------------------------------------------------------------------------
# Errors and authentication
# --------------------------------------------------------------------------

def test_missing_bucket_and_key(server, bucket):
    nowhere = oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, 'no-such-bucket')
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.get_object('k')
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.head_object('k')                # HEAD: the error travels in x-oss-err
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nowhere.list_objects()
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object('no/such/key')
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.head_object('no/such/key')


def test_wrong_secret_is_rejected(server):
    bad = oss2.Bucket(oss2.Auth(AK, 'not-the-secret'), server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch) as err:
        bad.get_object('anything')
    assert err.value.status == 403
    assert err.value.details['OSSAccessKeyId'] == AK
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        bad.put_object('anything', b'x' * 100000)      # body drained, connection reusable
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        oss2.Bucket(oss2.AuthV4(AK, 'nope'), server.endpoint, BUCKET,
                    region='cn-hangzhou').get_bucket_info()


def test_signature_covers_resource_and_subresources(server, bucket):
    bucket.put_object('a', b'A')
    bucket.put_object('b', b'B')
    auth = oss2.Auth(AK, SK)

    def signed_get(sign_path, sign_key, send_path):
        req = oss2.http.Request('GET', server.endpoint + sign_path)
        auth._sign_request(req, BUCKET, sign_key)
        return requests.get(server.endpoint + send_path,
                            headers={k: v for k, v in req.headers.items() if v is not None})

    assert signed_get('/%s/a' % BUCKET, 'a', '/%s/a' % BUCKET).content == b'A'
    replayed = signed_get('/%s/a' % BUCKET, 'a', '/%s/b' % BUCKET)
    assert replayed.status_code == 403 and b'SignatureDoesNotMatch' in replayed.content
    # objectMeta is a signed sub-resource, prefix is not.
    assert signed_get('', 'a', '/%s/a?objectMeta' % BUCKET).status_code == 403
    assert signed_get('', '', '/%s/?prefix=a' % BUCKET).status_code == 200


def test_unknown_access_key(server):
    stranger = oss2.Bucket(oss2.Auth('who-is-this', SK), server.endpoint, BUCKET)
    # oss2 has no exception class for InvalidAccessKeyId: it raises ServerError.
    with pytest.raises(oss2.exceptions.ServerError) as err:
        stranger.get_object('anything')
    assert (err.value.status, err.value.code) == (403, 'InvalidAccessKeyId')


def test_clock_skew(server, bucket, monkeypatch):
    stale = oss2.utils.http_date(int(time.time()) - 16 * 60)
    monkeypatch.setattr(oss2.utils, 'http_date', lambda *a: stale)
    with pytest.raises(oss2.exceptions.ServerError) as err:
        bucket.get_bucket_info()
    assert (err.value.status, err.value.code) == (403, 'RequestTimeTooSkewed')


def test_sts_tokens(server, bucket):
    bucket.put_object('sts.txt', b'via sts')
    sts = oss2.Bucket(oss2.StsAuth(STS_AK, STS_SK, STS_TOKEN), server.endpoint, BUCKET)
    assert sts.get_object('sts.txt').read() == b'via sts'
    sts_v4 = oss2.Bucket(oss2.StsAuth(STS_AK, STS_SK, STS_TOKEN, auth_version='v4'),
                         server.endpoint, BUCKET, region='cn-hangzhou')
    assert sts_v4.get_object('sts.txt').read() == b'via sts'
    assert server.requests[-1].headers['x-oss-security-token'] == STS_TOKEN

    wrong_token = oss2.Bucket(oss2.StsAuth(STS_AK, STS_SK, 'forged'), server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.ServerError) as err:
        wrong_token.get_object('sts.txt')
    assert err.value.status == 403
    no_token = oss2.Bucket(oss2.Auth(STS_AK, STS_SK), server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.ServerError) as err:
        no_token.get_object('sts.txt')
    assert err.value.code == 'InvalidAccessKeyId'


def test_v4_signatures(server, bucket):
    v4 = oss2.Bucket(oss2.AuthV4(AK, SK), server.endpoint, BUCKET, region='cn-hangzhou')
    v4.put_object('v4/obj', b'four')
    assert v4.get_object('v4/obj', byte_range=(1, 2)).read() == b'ou'
    assert [o.key for o in oss2.ObjectIteratorV2(v4, prefix='v4/')] == ['v4/obj']
    wrong_region = oss2.Bucket(oss2.AuthV4(AK, SK), server.endpoint, BUCKET, region='cn-beijing')
    with pytest.raises(oss2.exceptions.InvalidArgument):
        wrong_region.get_object('v4/obj')


def test_presigned_url(server, bucket):
    bucket.put_object('signed.txt', b'presigned')
    url = bucket.sign_url('GET', 'signed.txt', 60)
    assert requests.get(url).content == b'presigned'
    assert requests.get(url.replace('Signature=', 'Signature=x')).status_code == 403
    expired = bucket.sign_url('GET', 'signed.txt', -1)
    resp = requests.get(expired)
    assert resp.status_code == 403 and b'<Code>AccessDenied</Code>' in resp.content


def test_anonymous_access(server, bucket):
    server.put_object(PUBLIC, 'open.txt', b'for everyone')
    bucket.put_object('closed.txt', b'secret')
    anon_private = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.AccessDenied):
        anon_private.get_object('closed.txt')
    anon_public = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, PUBLIC)
    assert anon_public.get_object('open.txt').read() == b'for everyone'
    with pytest.raises(oss2.exceptions.AccessDenied):
        anon_public.put_object('open.txt', b'vandalism')


def test_virtual_host_addressing(server):
    # oss2 only uses virtual-host style for non-IP endpoints; route that
    # through the server acting as an HTTP proxy so no DNS is needed.
    vhost = oss2.Bucket(oss2.Auth(AK, SK), 'http://%s:%d' % (DOMAIN, server.port), BUCKET,
                        proxies={'http': server.endpoint})
    vhost.put_object('vhost/key', b'virtual')
    assert vhost.get_object('vhost/key').read() == b'virtual'
    assert server.requests[-1][:3] == ('GET', BUCKET, 'vhost/key')
    assert server.requests[-1].headers['host'] == '%s.%s:%d' % (BUCKET, DOMAIN, server.port)


# --------------------------------------------------------------------------
# HTTP details and instrumentation
# --------------------------------------------------------------------------

def test_keep_alive_and_content_length(server):
    server.put_object(PUBLIC, 'raw.txt', b'0123456789')
    etag = md5_etag(b'0123456789')
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)

    def call(method, path, headers=None):
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()

    resp, body = call('GET', '/%s/raw.txt' % PUBLIC)
    assert (resp.status, body, resp.getheader('Content-Length')) == (200, b'0123456789', '10')
    assert resp.getheader('ETag') == '"%s"' % etag and resp.getheader('x-oss-request-id')
    assert resp.getheader('Last-Modified').endswith(' GMT')

    resp, body = call('HEAD', '/%s/missing' % PUBLIC)
    assert resp.status == 404 and body == b'' and resp.getheader('x-oss-err')
    assert base64.b64decode(resp.getheader('x-oss-err')).count(b'<Code>NoSuchKey</Code>') == 1

    resp, body = call('GET', '/%s/raw.txt' % PUBLIC, {'If-None-Match': '"%s"' % etag})
    assert (resp.status, body) == (304, b'')

    resp, body = call('GET', '/%s/missing' % PUBLIC)
    assert resp.status == 404 and resp.getheader('Content-Type') == 'application/xml'
    assert int(resp.getheader('Content-Length')) == len(body) and b'<HostId>' in body

    resp, body = call('GET', '/%s/raw.txt' % PUBLIC, {'Range': 'bytes=2-4'})
    assert (resp.status, body, resp.getheader('Content-Range')) == (206, b'234', 'bytes 2-4/10')
    conn.close()


def test_readers_see_consistent_versions_during_overwrite(server, bucket):
    # A GET must never mix the ETag of one version with the bytes of another.
    versions = [bytes([i]) * (256 * 1024) for i in range(8)]
    bucket.put_object('racy', versions[0])
    errors, stop = [], threading.Event()

    def reader():
        client = oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)
        while not stop.is_set():
            got = client.get_object('racy')
            if md5_etag(got.read()) != got.etag:
                errors.append(got.etag)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for data in versions[1:] * 3:
        bucket.put_object('racy', data)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_request_log(server, bucket):
    bucket.put_object('logged', b'12345')
    server.reset_requests()
    bucket.get_object('logged', byte_range=(1, 3)).read()
    bucket.list_objects(prefix='log')
    assert server.request_count() == 2
    assert server.request_count('GET') == 2 and server.request_count('PUT') == 0
    method, name, key, query = server.requests[0]
    assert (method, name, key, query) == ('GET', BUCKET, 'logged', {})
    assert server.requests[0].headers['range'] == 'bytes=1-3'
    assert server.requests[1].key is None and server.requests[1].query['prefix'] == 'log'
    server.reset_requests()
    assert server.requests == []


def test_restart_keeps_data_and_stop_drops_connections(tmp_path):
    first = OssServer(str(tmp_path), {AK: SK}).start()
    first.create_bucket('persist')
    client = oss2.Bucket(oss2.Auth(AK, SK), first.endpoint, 'persist')
    client.put_object('k', b'survives')
    first.stop()
    with pytest.raises(oss2.exceptions.RequestError):
        client.get_object('k')

    with OssServer(str(tmp_path), {AK: SK}) as second:
        again = oss2.Bucket(oss2.Auth(AK, SK), second.endpoint, 'persist')
        assert again.get_object('k').read() == b'survives'
        assert [o.key for o in oss2.ObjectIterator(again)] == ['k']
