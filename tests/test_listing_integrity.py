"""The saved listing is checked before use: a flipped bit (in a key, a size or an ETag) or a
hostile entry makes the remount list the store again and serve the right names and bytes; with
the store down the mount then fails as a first mount would, never serving a garbled name or size.
Hostile payloads of both formats that cachefs reads: the columns of format 3 (what it saves) and
the records of format 2 (what it saved before, still read).
"""

import io
import math
import os
import struct
import time

import msgpack
import pytest
import xxhash

from cachefs import errors
from cachefs.cache.listing import (FILE_NAME, FORMAT_2, FORMAT_VERSION, MAGIC, MAGIC_2,
                                   decode_listing, encode_listing, load_listing)
from cachefs.ufs.base import ObjectInfo
from conftest import (Mounted, assert_every_bit_flip_is_refused, assert_tree_matches,
                      is_mounted, run_cachefs)

SOURCE = 'oss://bucket/data'
GOOD = [ObjectInfo('a/b.bin', 10, '"etag-1"', 1_700_000_000_000_000_000)]


def saved_file(folder, fields, magic=MAGIC_2):
    """A listing file with a valid checksum around any payload: what a bug or a hostile writer
    could leave, rather than what the disk garbles. Format 2 unless told."""
    payload = fields if isinstance(fields, bytes) else msgpack.packb(fields, use_bin_type=True)
    (folder / FILE_NAME).write_bytes(magic + xxhash.xxh3_128_digest(payload) + payload)


def fields_with(**changes):
    """A format-2 payload: one [key, size, ETag, mtime_ns] record per object."""
    fields = {'version': FORMAT_2, 'source': SOURCE, 'listed_at': time.time() - 10,
              'objects': [['a/b.bin', 10, '"etag-1"', 0]]}
    fields.update(changes)
    return fields


def packed(*values, fmt='q'):
    return struct.pack(f'<{len(values)}{fmt}', *values)


def columns_with(**changes):
    """A format-3 payload: columns of keys, ETags, sizes and mtimes (packed little-endian)."""
    fields = {'version': FORMAT_VERSION, 'source': SOURCE, 'listed_at': time.time() - 10,
              'keys': ['a/b.bin'], 'etags': ['"etag-1"'], 'sizes': packed(10),
              'mtimes': packed(0)}
    fields.update(changes)
    return fields


def entry(key='a/b.bin', size=10, etag='"etag-1"', mtime_ns=0):
    return fields_with(objects=[[key, size, etag, mtime_ns]])


def test_a_saved_listing_reads_back_as_written(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(encode_listing(SOURCE, GOOD, 1234.5))
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, GOOD)


HOSTILE = {
    'negative size': entry(size=-1),
    'size as text': entry(size='10'),
    'size as bool': entry(size=True),
    'size as float': entry(size=10.0),
    'size over 2**63': entry(size=1 << 63),
    'key as bytes': entry(key=b'a/b.bin'),
    'empty key': entry(key=''),
    'key as a number': entry(key=7),
    'etag as a list': entry(etag=['x']),
    'mtime as text': entry(mtime_ns='now'),
    'three fields': fields_with(objects=[['a/b.bin', 10, '"etag-1"']]),
    'five fields': fields_with(objects=[['a/b.bin', 10, '"etag-1"', 0, 'x']]),
    'entry as a map': fields_with(objects=[{'a': 1, 'b': 2, 'c': 3, 'd': 4}]),
    'entry as text': fields_with(objects=['abcd']),
    'objects as a map': fields_with(objects={'a': 1}),
    'no objects': {'version': FORMAT_2, 'source': SOURCE, 'listed_at': 1.0},
    'listed_at as text': fields_with(listed_at='yesterday'),
    'listed_at NaN': fields_with(listed_at=math.nan),
    'listed_at infinite': fields_with(listed_at=math.inf),
    'listed_at in the future': fields_with(listed_at=time.time() + 365 * 86400),
    'payload not a map': [1, 2, 3],
    'nested 10000 deep': b'\x91' * 10000 + b'\x90',      # raw msgpack: [[[...]]]
}


@pytest.mark.parametrize('fields', HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_saved_listing_is_ignored_with_one_warning(tmp_path, fields, caplog):
    saved_file(tmp_path, fields)
    assert load_listing(str(tmp_path), SOURCE) is None
    warnings = [r for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'listing the store again' in warnings[0].getMessage()


HOSTILE_COLUMNS = {
    'negative size': columns_with(sizes=packed(-1)),
    'size with the top bit set (2**63 unsigned)': columns_with(sizes=packed(1 << 63, fmt='Q')),
    'sizes as a list': columns_with(sizes=[10]),
    'sizes as text': columns_with(sizes='\x0a' + '\0' * 7),
    'sizes a byte short': columns_with(sizes=packed(10)[:7]),
    'sizes for two objects': columns_with(sizes=packed(10, 10)),
    'no sizes': {k: v for k, v in columns_with().items() if k != 'sizes'},
    'mtimes a byte long': columns_with(mtimes=packed(0) + b'\0'),
    'mtimes as a list': columns_with(mtimes=[0]),
    'no mtimes': {k: v for k, v in columns_with().items() if k != 'mtimes'},
    'key as bytes': columns_with(keys=[b'a/b.bin']),
    'empty key': columns_with(keys=['']),
    'empty key among good ones': columns_with(keys=['a', '', 'c'], etags=['e'] * 3,
                                              sizes=packed(1, 2, 3), mtimes=packed(0, 0, 0)),
    'key as a number': columns_with(keys=[7]),
    'key as None': columns_with(keys=[None]),
    'keys as a map': columns_with(keys={'a/b.bin': 1}),
    'keys as text': columns_with(keys='a/b.bin'),
    'no keys': {k: v for k, v in columns_with().items() if k != 'keys'},
    'two keys for one size': columns_with(keys=['a', 'b']),
    'etag as a list': columns_with(etags=[['x']]),
    'etag as bytes': columns_with(etags=[b'x']),
    'two etags for one key': columns_with(etags=['x', 'y']),
    'no etags': {k: v for k, v in columns_with().items() if k != 'etags'},
    'records of format 2 under the magic of format 3': fields_with(version=FORMAT_VERSION),
    'listed_at as text': columns_with(listed_at='yesterday'),
    'listed_at NaN': columns_with(listed_at=math.nan),
    'listed_at infinite': columns_with(listed_at=math.inf),
    'listed_at in the future': columns_with(listed_at=time.time() + 365 * 86400),
    'no listed_at': {k: v for k, v in columns_with().items() if k != 'listed_at'},
    'payload not a map': [1, 2, 3],
    'nested 10000 deep': b'\x91' * 10000 + b'\x90',
}


@pytest.mark.parametrize('fields', HOSTILE_COLUMNS.values(), ids=HOSTILE_COLUMNS.keys())
def test_a_hostile_saved_listing_of_columns_is_ignored_with_one_warning(tmp_path, fields,
                                                                        caplog):
    saved_file(tmp_path, fields, magic=MAGIC)
    assert load_listing(str(tmp_path), SOURCE) is None
    warnings = [r for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'listing the store again' in warnings[0].getMessage()


def test_the_good_payloads_of_the_hostile_cases_are_read(tmp_path):
    """The hostile cases differ from a readable listing in their one change only."""
    for fields, magic in ((fields_with(), MAGIC_2), (columns_with(), MAGIC)):
        saved_file(tmp_path, fields, magic=magic)
        assert load_listing(str(tmp_path), SOURCE)[1] == [ObjectInfo('a/b.bin', 10, '"etag-1"', 0)]


@pytest.mark.parametrize('cut', [0, 5, len(MAGIC) + 3, len(MAGIC) + 16, -1])
def test_a_truncated_saved_listing_is_ignored(tmp_path, cut):
    data = encode_listing(SOURCE, GOOD, 1234.5)
    (tmp_path / FILE_NAME).write_bytes(data[:cut])
    assert load_listing(str(tmp_path), SOURCE) is None


def test_every_single_bit_flip_of_a_saved_listing_is_detected():
    data = encode_listing(SOURCE, GOOD * 3, 1234.5)
    assert_every_bit_flip_is_refused(data, lambda garbled: decode_listing(garbled, SOURCE))


# -- remounts with a garbled listing --

def flip_field(path, key, field):
    """Flip one bit in the middle of `field` ('key', 'size' or 'etag') of `key`'s object, found in
    the raw bytes: in format 3 the key, the ETag and the size (int64, little-endian) of object i
    are item i of their columns; in format 2 the entry is msgpack [key, size, ETag, mtime_ns]."""
    data = bytearray(path.read_bytes())
    key_bytes = key.encode()
    assert data.count(key_bytes) == 1
    at = data.index(key_bytes)
    if data.startswith(MAGIC):
        fields = msgpack.unpackb(bytes(data[len(MAGIC) + 16:]), raw=False)
        index = fields['keys'].index(key)
        etag_bytes = fields['etags'][index].encode()
        assert data.count(etag_bytes) == 1 and data.count(fields['sizes']) == 1
        offset = {'key': at + len(key) // 2,
                  'size': data.index(fields['sizes']) + 8 * index,    # the lowest byte
                  'etag': data.index(etag_bytes) + len(etag_bytes) // 2}[field]
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        return
    size_at = at + len(key_bytes)
    objects = msgpack.Unpacker(io.BytesIO(bytes(data[size_at:])), raw=False)
    size, etag = next(objects), next(objects)
    etag_at = size_at + len(msgpack.packb(size))
    etag_end = etag_at + len(msgpack.packb(etag))
    assert type(size) is int and data[etag_end - len(etag):etag_end] == etag.encode()
    offset = {'key': at + len(key) // 2,
              'size': etag_at - 1,                  # the lowest byte: one byte more or less
              'etag': etag_end - len(etag) // 2}[field]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def decode_source(data):
    payload = bytes(data[len(MAGIC) + 16:])
    return msgpack.unpackb(payload, raw=False)['source']


def mount_and_save_a_listing(source, mounter):
    mounted = mounter.mount(source)
    mounter.umount(mounted)
    return next(mounted.cache_dir.glob('*/' + FILE_NAME))


@pytest.mark.fuse
@pytest.mark.parametrize('field', ['key', 'size', 'etag'])
def test_a_flipped_bit_in_the_saved_listing_makes_the_remount_list_again(private_oss_source,
                                                                         mounter, field):
    source = private_oss_source
    listing = mount_and_save_a_listing(source, mounter)
    flip_field(listing, 'shard-1.bin', field)
    mounted = mounter.mount(source, name='again')
    assert_tree_matches(mounted.path, source.manifest)     # names, sizes and sha256
    log = mounted.log_file.read_text()
    warnings = [line for line in log.splitlines() if ' WARNING ' in line]
    assert len(warnings) == 1 and 'corrupt saved listing' in warnings[0], warnings
    assert 'listed 4 objects' in log


@pytest.mark.fuse
def test_a_hostile_listing_with_a_valid_checksum_makes_the_remount_list_again(
        private_oss_source, mounter):
    source = private_oss_source
    listing = mount_and_save_a_listing(source, mounter)
    _, objects = load_listing(str(listing.parent), decode_source(listing.read_bytes()))
    fields = fields_with(source=decode_source(listing.read_bytes()),
                         objects=[[o.key, -o.size, o.etag, o.mtime_ns] for o in objects])
    saved_file(listing.parent, fields)
    mounted = mounter.mount(source, name='again')
    assert_tree_matches(mounted.path, source.manifest)
    assert 'listed 4 objects' in mounted.log_file.read_text()


@pytest.mark.fuse
def test_a_garbled_listing_with_the_store_down_fails_the_mount_instead_of_serving_it(
        private_oss_source, mounter):
    source = private_oss_source
    listing = mount_and_save_a_listing(source, mounter)
    flip_field(listing, 'shard-1.bin', 'size')
    source.extra['server'].stop()
    mountpoint = mounter.mountpoint('again')
    result = run_cachefs('mount', source.url, mountpoint, *source.args, '--cache-dir',
                         mounter.cache_dir, '--retry-timeout', '2s', '--request-timeout', '2s',
                         env=source.env)
    if result.returncode == 0:          # a wrong success: leave nothing mounted
        mounter.mounted.append(Mounted(mountpoint, int(os.getxattr(
            mountpoint, 'user.cachefs.pid')), mounter.cache_dir, None))
    assert result.returncode == errors.EXIT_STORE, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not is_mounted(mountpoint)
