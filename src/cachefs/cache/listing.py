"""The saved store listing, so that a remount of the same source does not list the bucket again.

One file per source folder, written atomically (temp file, fsync, rename), mode 0600:

    magic 'CFSLST03' | xxh3-128 of the payload (16 bytes) | payload (msgpack)

The payload is a map of the format version, the source, the time of the listing and four
columns of equal length, one item per object: 'keys' and 'etags' (arrays of text), 'sizes' and
'mtimes' (little-endian int64, packed into one bin each). Columns, rather than one record per
object, because a remount of 1.28 million objects must take seconds: msgpack decodes an array
of strings and Python reads packed integers (array.frombytes) far faster than it decodes and
checks 1.28 million small records, and every check is one pass over a column.

A listing that fails its checksum or any check of its fields (types, columns of one length,
non-empty keys, sizes >= 0 and < 2**63, a listing time not in the future), or that is of another
format or source, is ignored with one warning and the store is listed again: it is a cache,
never the truth. Without the checksum a flipped bit in a size would serve a truncated or padded
file, and one in a key a file under a garbled name.

Format 2 (magic 'CFSLST02', one [key, size, ETag, mtime_ns] record per object, as saved by
cachefs before format 3) is still read, with the same checks, so that an upgrade does not list a
large bucket again; the next listing saves format 3.
"""

import contextlib
import gc
import logging
import math
import os
import sys
import time

from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import xxhash

from ..ufs.base import ObjectInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
FILE_NAME = 'listing.msgpack'
MAGIC = b'CFSLST03'
FORMAT_2 = 2
MAGIC_2 = b'CFSLST02'
_DIGEST_SIZE = 16
_MAX_INT = 1 << 63
_CLOCK_SKEW = 300       # seconds a listing may seem to come from the future (clock steps)
_SWAP = sys.byteorder != 'little'       # the packed columns are little-endian


class BadListing(ValueError):
    """A saved listing that fails its checksum or the checks of its fields."""


class Columns:
    """A listing in columns: item i of each is object i. Sizes and mtimes are `array('q')`
    (8 bytes per object, no int object each); the tree is built from the columns directly
    (namespace.build_tree_from_columns), so that a remount makes no object per file."""

    __slots__ = ('keys', 'sizes', 'etags', 'mtimes')

    def __init__(self, keys: list[str], sizes: Sequence[int], etags: list[str],
                 mtimes: Sequence[int]):
        self.keys, self.sizes, self.etags, self.mtimes = keys, sizes, etags, mtimes

    @classmethod
    def of(cls, objects: Iterable[ObjectInfo]) -> 'Columns':
        objects = objects if isinstance(objects, list) else list(objects)
        return cls([o.key for o in objects], array('q', [o.size for o in objects]),
                   [o.etag for o in objects], array('q', [o.mtime_ns for o in objects]))

    def __len__(self):
        return len(self.keys)

    def objects(self) -> list[ObjectInfo]:
        # The collector would walk the growing list again and again (1.28 million objects:
        # 1.4 s instead of 0.65 s), and these objects form no cycles.
        with _collector_paused():
            return list(map(ObjectInfo, self.keys, self.sizes, self.etags, self.mtimes))


@contextlib.contextmanager
def _collector_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _packed(values):
    column = array('q', values)      # raises OverflowError outside int64, as it should
    # (a copy also when `values` is an array: byteswap() must not touch the caller's)
    if _SWAP:
        column.byteswap()
    return column.tobytes()


def encode_listing(source, objects, listed_at):
    """The file's bytes for `objects`: ObjectInfo, or a `Columns`."""
    columns = objects if isinstance(objects, Columns) else Columns.of(objects)
    fields = {
        'version': FORMAT_VERSION,
        'source': source,
        'listed_at': listed_at,
        'keys': columns.keys,
        'etags': columns.etags,
        'sizes': _packed(columns.sizes),
        'mtimes': _packed(columns.mtimes),
    }
    # Local file names need not be UTF-8: keep their bytes through surrogateescape.
    payload = msgpack.packb(fields, use_bin_type=True, unicode_errors='surrogateescape')
    return MAGIC + xxhash.xxh3_128_digest(payload) + payload


def save_listing(folder, source, objects, listed_at=None):
    path = os.path.join(folder, FILE_NAME)
    data = encode_listing(source, objects, time.time() if listed_at is None else listed_at)
    tmp = f'{path}.tmp.{os.getpid()}'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_int(value, low=0):
    return type(value) is int and low <= value < _MAX_INT


def _payload(data, magic):
    digest = data[len(magic):len(magic) + _DIGEST_SIZE]
    payload = memoryview(data)[len(magic) + _DIGEST_SIZE:]
    if len(digest) != _DIGEST_SIZE or xxhash.xxh3_128_digest(payload) != digest:
        raise BadListing('checksum mismatch')
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                 unicode_errors='surrogateescape')
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadListing(f'undecodable ({exc})') from None
    if type(fields) is not dict:
        raise BadListing('not a map')
    return fields


def _listed_at(fields):
    listed_at: Any = fields.get('listed_at')
    if (type(listed_at) not in (int, float) or not math.isfinite(listed_at)
            or not 0 < listed_at < time.time() + _CLOCK_SKEW):
        raise BadListing(f'listing time {listed_at!r}')
    return float(listed_at)


def _texts(fields, name, count=None):
    column = fields.get(name)
    if type(column) is not list or (count is not None and len(column) != count):
        raise BadListing(f'column {name!r} is not a list of one item per object')
    if not set(map(type, column)) <= {str}:
        raise BadListing(f'column {name!r} holds other items than text')
    return column


def _ints(fields, name, count):
    column = fields.get(name)
    if type(column) is not bytes or len(column) != 8 * count:
        raise BadListing(f'column {name!r} is not {count} packed int64')
    values = array('q')
    values.frombytes(column)
    if _SWAP:
        values.byteswap()
    return values


def decode_columns(data, source):
    """(listed_at, Columns) from a saved file's bytes (format 3 or 2); None when it is of another
    format version or source; raises BadListing when it fails a check. Every field is checked:
    a hostile or garbled listing must not reach the tree builder."""
    if data[:len(MAGIC_2)] == MAGIC_2:
        return _decode_format_2(data, source)
    if data[:len(MAGIC)] != MAGIC:
        return None                  # an older format (it had no magic), or not a listing
    fields = _payload(data, MAGIC)
    if fields.get('version') != FORMAT_VERSION or fields.get('source') != source:
        return None
    listed_at = _listed_at(fields)
    keys = _texts(fields, 'keys')
    if '' in keys:
        raise BadListing('an empty key')
    etags = _texts(fields, 'etags', len(keys))
    sizes = _ints(fields, 'sizes', len(keys))
    if sizes and min(sizes) < 0:     # < 2**63 holds for any int64
        raise BadListing(f'a negative size ({min(sizes)})')
    mtimes = _ints(fields, 'mtimes', len(keys))     # any int64 is a time
    return listed_at, Columns(keys, sizes, etags, mtimes)


def _decode_format_2(data, source):
    fields = _payload(data, MAGIC_2)
    if fields.get('version') != FORMAT_2 or fields.get('source') != source:
        return None
    listed_at = _listed_at(fields)
    entries = fields.get('objects')
    if type(entries) is not list:
        raise BadListing('no object list')
    for entry in entries:
        if type(entry) is not list or len(entry) != 4:
            raise BadListing('an object entry is not a 4-item list')
        key, size, etag, mtime_ns = entry
        if type(key) is not str or not key or type(etag) is not str or not _is_int(size) \
                or not _is_int(mtime_ns, -_MAX_INT):
            raise BadListing(f'object entry {entry!r:.200}')
    keys, sizes, etags, mtimes = (list(column) for column in zip(*entries)) if entries \
        else ([], [], [], [])
    return listed_at, Columns(keys, sizes, etags, mtimes)


def decode_listing(data, source):
    """(listed_at, [ObjectInfo]) from a saved file's bytes; None when it is of another format
    version or source; raises BadListing when it fails a check."""
    saved = decode_columns(data, source)
    return None if saved is None else (saved[0], saved[1].objects())


def load_listing(folder, source):
    """Return (listed_at, [ObjectInfo]) or None when there is no usable saved listing."""
    saved = load_columns(folder, source)
    return None if saved is None else (saved[0], saved[1].objects())


def load_columns(folder, source):
    """Return (listed_at, Columns) or None when there is no usable saved listing."""
    path = os.path.join(folder, FILE_NAME)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning('ignoring unreadable saved listing %s (%s); listing the store again', path,
                    exc.strerror)
        return None
    try:
        saved = decode_columns(data, source)
    except BadListing as exc:
        log.warning('ignoring corrupt saved listing %s (%s); listing the store again', path, exc)
        return None
    if saved is None:
        log.info('ignoring saved listing %s: other format version or source', path)
        return None
    return saved
