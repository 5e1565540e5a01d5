"""Every read path checks the ETag of the answer against the listed one (issue 11, item 6).

The version guarantee of a read rested on If-Match alone, and some S3-compatible stores and
proxies ignore If-Match. Here a proxy drops If-Match (`support.header_proxy`), or the OSS test
server ignores it, and the object is replaced between two block reads: the read of the second
block fails with `ObjectChanged` (EIO) on every path, and a mounted file never mixes the two
versions.
"""

import contextlib
import dataclasses
import errno
import os
import random

import pytest

from cachefs.ufs import etags
from cachefs.ufs.errors import ObjectChanged
from cachefs.ufs.oss import OssStore
from cachefs.ufs.s3 import S3Store

from conftest import BLOCK_SIZE, OSS_BUCKET, S3_BUCKET
from support.header_proxy import HeaderStrippingProxy

KEY = 'shard-1.bin'


@pytest.fixture
def if_match_ignored(seaweed, s3_env):
    with HeaderStrippingProxy('127.0.0.1', seaweed.s3_port, strip={'If-Match'},
                              access_key=seaweed.access_key,
                              secret_key=seaweed.secret_key) as proxy:
        yield proxy


@contextlib.contextmanager
def opened(store):
    try:
        yield store
    finally:
        store.close()


def replace_object(source, key):
    """Put a new version of `key` (same size, other bytes) into the S3 bucket."""
    old = (source.local_root / key).read_bytes()
    new = random.Random(key).randbytes(len(old))
    source.extra['client'].put_object(Bucket=S3_BUCKET, Key=f'{source.extra["prefix"]}/{key}',
                                      Body=new)
    return old, new


async def read(store, path, obj, offset, length):
    if path == 'trio':
        return await store.read_async(obj.key, obj.etag, offset, length)
    if path == 'sdk':
        store._getter = None
    return store.read(obj.key, obj.etag, offset, length)


@pytest.mark.parametrize('path', ['trio', 'threads', 'sdk'])
async def test_a_block_of_a_replaced_object_is_refused_when_if_match_is_ignored(
        mutable_s3_source, if_match_ignored, path):
    source = mutable_s3_source
    prefix = source.extra['prefix'] + '/'
    with opened(S3Store(S3_BUCKET, prefix, endpoint_url=if_match_ignored.endpoint)) as store:
        obj = {o.key: o for o in store.list_objects()}[KEY]
        old = (source.local_root / KEY).read_bytes()
        assert await read(store, path, obj, 0, BLOCK_SIZE) == old[:BLOCK_SIZE]
        replace_object(source, KEY)
        with pytest.raises(ObjectChanged, match='ignored If-Match'):
            await read(store, path, obj, BLOCK_SIZE, BLOCK_SIZE)
    # The store did answer with the new version (206), so only the ETag check refused it.
    statuses = [status for p, status, _ in if_match_ignored.get_answers() if p.endswith(KEY)]
    assert statuses[-1] == 206


def test_a_block_of_a_replaced_oss_object_is_refused_when_the_store_ignores_if_match(
        private_oss_source, monkeypatch):
    server = private_oss_source.extra['server']
    for name, value in private_oss_source.env.items():
        if name.startswith('OSS_'):
            monkeypatch.setenv(name, value)
    store = OssStore(OSS_BUCKET, 'data/', endpoint_url=server.endpoint)
    obj = {o.key: o for o in store.list_objects()}[KEY]
    old = (private_oss_source.local_root / KEY).read_bytes()
    server.ignore_if_match = True
    assert store.read(obj.key, obj.etag, 0, BLOCK_SIZE) == old[:BLOCK_SIZE]
    server.put_object(OSS_BUCKET, 'data/' + KEY, random.Random(1).randbytes(len(old)))
    with pytest.raises(ObjectChanged, match='ignored If-Match'):
        store.read(obj.key, obj.etag, BLOCK_SIZE, BLOCK_SIZE)


@pytest.mark.fuse
def test_a_mounted_file_never_mixes_two_versions_when_if_match_is_ignored(
        mounter, mutable_s3_source, if_match_ignored):
    """Block 0 is read, the object is replaced, the rest is read: each read gives the old
    version's bytes or EIO, and the blocks of the new version give EIO."""
    source = dataclasses.replace(mutable_s3_source,
                                 args=['--endpoint-url', if_match_ignored.endpoint])
    mounted = mounter.mount(source, '--prefetch-window', '0', '--read-ahead', '128K',
                            '--retry-timeout', '3s')
    fd = os.open(mounted.path / KEY, os.O_RDONLY)
    try:
        old = (source.local_root / KEY).read_bytes()
        assert os.pread(fd, 65536, 0) == old[:65536]
        replace_object(mutable_s3_source, KEY)
        failed = 0
        for offset in range(BLOCK_SIZE, len(old), BLOCK_SIZE):
            try:
                data = os.pread(fd, BLOCK_SIZE, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO
                failed += 1
                continue
            assert data == old[offset:offset + len(data)], f'new bytes at {offset}'
        assert failed == len(range(BLOCK_SIZE, len(old), BLOCK_SIZE))
    finally:
        os.close(fd)


# -- the comparison (pure logic) --

@pytest.mark.parametrize('answered', ['"abc-3"', 'abc-3', 'W/"abc-3"', ' "abc-3" '])
def test_quoting_and_weak_prefix_do_not_make_another_version(answered):
    etags.check_answer('abc-3', answered)


@pytest.mark.parametrize('answered', ['"abc-4"', '"ABC-3"', '"abc"', '""', '"abc-3"x'])
def test_another_tag_is_another_version(answered):
    with pytest.raises(ObjectChanged):
        etags.check_answer('abc-3', answered)


def test_an_answer_without_an_etag_rests_on_if_match():
    etags.check_answer('abc', None)
