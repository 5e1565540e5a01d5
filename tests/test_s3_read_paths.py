"""`S3Store.read_paths()` and `read(..., path=...)`: the public way to read through one named
path (bench/get_cost.py compares them), against the loopback SeaweedFS."""

import pytest

from cachefs.ufs.s3 import S3Store

from conftest import S3_BUCKET


def count_sdk_reads(store):
    calls = []
    store.client.meta.events.register('before-call.s3.GetObject', lambda **kw: calls.append(1))
    return calls


def test_read_paths_names_get_object_and_the_lean_paths_this_botocore_allows(seaweed, s3_env):
    store = S3Store(S3_BUCKET, 'data/', endpoint_url=seaweed.endpoint)
    assert store.read_paths() == ('get_object', 'lean', 'trio')


def test_a_read_through_each_path_returns_the_bytes_of_the_source(seaweed, s3_env):
    store = S3Store(S3_BUCKET, 'data/', endpoint_url=seaweed.endpoint)
    sdk_reads = count_sdk_reads(store)
    obj = next(o for o in store.list_objects() if o.size > 10)
    source = (s3_env.local_root / obj.key).read_bytes()
    assert store.read(obj.key, obj.etag, 3, 7, path='lean') == source[3:10]
    assert sdk_reads == []
    assert store.read(obj.key, obj.etag, 3, 7, path='get_object') == source[3:10]
    assert len(sdk_reads) == 1
    assert store.read(obj.key, obj.etag, 3, 7) == source[3:10]      # the default: lean again
    assert len(sdk_reads) == 1


def test_a_path_read_cannot_take_is_a_value_error_that_names_those_it_can(seaweed, s3_env):
    store = S3Store(S3_BUCKET, 'data/', endpoint_url=seaweed.endpoint)
    obj = next(o for o in store.list_objects() if o.size)
    with pytest.raises(ValueError, match="'trio'.*get_object"):
        store.read(obj.key, obj.etag, 0, 1, path='trio')        # read_async is the trio path
