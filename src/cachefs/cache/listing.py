"""The saved store listing, so that a remount of the same source does not list the bucket again.

One file per source folder, written atomically (temp file, fsync, rename), mode 0600:

    magic 'CFSLST02' | xxh3-128 of the payload (16 bytes) | payload (msgpack)

The payload holds the format version, the source, the time of the listing and one
(key, size, ETag, mtime_ns) per object. A listing that fails its checksum or any check of its
fields (types, sizes >= 0, a time not in the future), or that is of another format or source, is
ignored with one warning and the store is listed again: it is a cache, never the truth. Without
the checksum a flipped bit in a size would serve a truncated or padded file, and one in a key a
file under a garbled name.
"""

import logging
import math
import os
import time

from typing import Any

import msgpack
import xxhash

from ..ufs.base import ObjectInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
FILE_NAME = 'listing.msgpack'
MAGIC = b'CFSLST02'
_DIGEST_SIZE = 16
_MAX_INT = 1 << 63
_CLOCK_SKEW = 300       # seconds a listing may seem to come from the future (clock steps)


class BadListing(ValueError):
    """A saved listing that fails its checksum or the checks of its fields."""


def encode_listing(source, objects, listed_at):
    fields = {
        'version': FORMAT_VERSION,
        'source': source,
        'listed_at': listed_at,
        'objects': [(o.key, o.size, o.etag, o.mtime_ns) for o in objects],
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


def decode_listing(data, source):
    """(listed_at, [ObjectInfo]) from a saved file's bytes; None when it is of another format
    version or source; raises BadListing when it fails a check."""
    if data[:len(MAGIC)] != MAGIC:
        return None                  # an older format (it had no magic), or not a listing
    digest = data[len(MAGIC):len(MAGIC) + _DIGEST_SIZE]
    payload = memoryview(data)[len(MAGIC) + _DIGEST_SIZE:]
    if len(digest) != _DIGEST_SIZE or xxhash.xxh3_128_digest(payload) != digest:
        raise BadListing('checksum mismatch')
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                 unicode_errors='surrogateescape')
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadListing(f'undecodable ({exc})') from None
    if type(fields) is not dict:
        raise BadListing('not a map')
    if fields.get('version') != FORMAT_VERSION or fields.get('source') != source:
        return None
    listed_at: Any = fields.get('listed_at')
    if (type(listed_at) not in (int, float) or not math.isfinite(listed_at)
            or not 0 < listed_at < time.time() + _CLOCK_SKEW):
        raise BadListing(f'listing time {listed_at!r}')
    entries = fields.get('objects')
    if type(entries) is not list:
        raise BadListing('no object list')
    objects: list[ObjectInfo] = []
    append = objects.append
    for entry in entries:
        # everything is checked: a hostile or garbled entry must not reach the tree builder
        if type(entry) is not list or len(entry) != 4:
            raise BadListing('an object entry is not a 4-item list')
        key, size, etag, mtime_ns = entry
        if type(key) is not str or not key or type(etag) is not str or not _is_int(size) \
                or not _is_int(mtime_ns, -_MAX_INT):
            raise BadListing(f'object entry {entry!r:.200}')
        append(ObjectInfo(key, size, etag, mtime_ns))
    return float(listed_at), objects


def load_listing(folder, source):
    """Return (listed_at, [ObjectInfo]) or None when there is no usable saved listing."""
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
        saved = decode_listing(data, source)
    except BadListing as exc:
        log.warning('ignoring corrupt saved listing %s (%s); listing the store again', path, exc)
        return None
    if saved is None:
        log.info('ignoring saved listing %s: other format version or source', path)
    return saved
