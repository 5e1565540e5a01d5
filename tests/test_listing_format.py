"""The saved listing's format 3 (columns): what is saved reads back equal, on the edge-case
listing and on random ones; every flipped bit is caught; a file of format 2 (records, saved
before format 3) is still read, with the same checks, so that an upgrade lists nothing again.
"""

import time

import msgpack
import xxhash

from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.cache.listing import (FILE_NAME, FORMAT_2, MAGIC, MAGIC_2, decode_listing,
                                   encode_listing, load_listing, save_listing)
from cachefs.demo.dataset import edge_case_layout
from cachefs.ufs.base import ObjectInfo
from conftest import assert_every_bit_flip_is_refused

SOURCE = 's3://bucket/data'
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


def edge_case_listing():
    objects = [ObjectInfo(key, size, f'"{i:032x}"', 1_700_000_000_000_000_000 + i)
               for i, (key, size) in enumerate(edge_case_layout(256 * 1024))]
    # the extremes of every field, a directory marker and a name that is not UTF-8
    return objects + [ObjectInfo('max', (1 << 63) - 1, '', (1 << 63) - 1),
                      ObjectInfo('min', 0, '"e"', -(1 << 63)),
                      ObjectInfo('dir/', 0, '"d"', 0),
                      ObjectInfo('bad-\udcff-utf8', 1, '"x"', 1)]


def format_2_file(objects, listed_at, source=SOURCE):
    """A listing file as cachefs saved it before format 3."""
    fields = {'version': FORMAT_2, 'source': source, 'listed_at': listed_at,
              'objects': [(o.key, o.size, o.etag, o.mtime_ns) for o in objects]}
    payload = msgpack.packb(fields, use_bin_type=True, unicode_errors='surrogateescape')
    return MAGIC_2 + xxhash.xxh3_128_digest(payload) + payload


def test_the_edge_case_listing_reads_back_equal(tmp_path):
    objects = edge_case_listing()
    save_listing(str(tmp_path), SOURCE, objects, 1234.5)
    assert (tmp_path / FILE_NAME).read_bytes().startswith(MAGIC)
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, objects)


def test_an_empty_listing_reads_back_empty(tmp_path):
    save_listing(str(tmp_path), SOURCE, [], 1234.5)
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, [])


OBJECTS = st.lists(st.builds(ObjectInfo, st.text(min_size=1), st.integers(0, (1 << 63) - 1),
                             st.text(), INT64), max_size=50)


@settings(max_examples=200, deadline=None)
@given(objects=OBJECTS, listed_at=st.floats(1, time.time()))
def test_a_random_listing_reads_back_equal(objects, listed_at):
    assert decode_listing(encode_listing(SOURCE, objects, listed_at), SOURCE) == \
        (listed_at, objects)


def test_a_listing_of_another_source_is_not_used(tmp_path):
    save_listing(str(tmp_path), SOURCE, edge_case_listing(), 1234.5)
    assert load_listing(str(tmp_path), SOURCE + '/other') is None


def test_every_single_bit_flip_of_a_listing_of_columns_is_detected():
    data = encode_listing(SOURCE, edge_case_listing()[-4:], 1234.5)
    assert data.startswith(MAGIC)
    assert_every_bit_flip_is_refused(data, lambda garbled: decode_listing(garbled, SOURCE))


def test_a_format_2_listing_is_still_read(tmp_path):
    objects = edge_case_listing()
    (tmp_path / FILE_NAME).write_bytes(format_2_file(objects, 1234.5))
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, objects)


def test_a_format_2_listing_of_another_source_is_not_used(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(format_2_file(edge_case_listing(), 1234.5, 'x://y'))
    assert load_listing(str(tmp_path), SOURCE) is None


def test_an_empty_format_2_listing_is_read_empty(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(format_2_file([], 1234.5))
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, [])


def test_every_single_bit_flip_of_a_format_2_listing_is_detected():
    data = format_2_file(edge_case_listing()[-4:], 1234.5)
    assert_every_bit_flip_is_refused(data, lambda garbled: decode_listing(garbled, SOURCE))


def test_the_next_save_after_a_format_2_listing_writes_columns(tmp_path):
    objects = edge_case_listing()
    (tmp_path / FILE_NAME).write_bytes(format_2_file(objects, 1234.5))
    listed_at, read = load_listing(str(tmp_path), SOURCE)
    save_listing(str(tmp_path), SOURCE, read, listed_at)
    assert (tmp_path / FILE_NAME).read_bytes().startswith(MAGIC)
    assert load_listing(str(tmp_path), SOURCE) == (1234.5, objects)
