"""The saved store listing, so that a remount of the same source does not list the bucket again.

One msgpack file per source folder, written atomically (temp file, fsync, rename), mode 0600.
A listing that cannot be read (corrupt, another format version, another source) is ignored and
the store is listed again: it is a cache, never the truth.
"""

import logging
import os
import time

import msgpack

from ..ufs.base import ObjectInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = 'listing.msgpack'


def save_listing(folder, source, objects, listed_at=None):
    path = os.path.join(folder, FILE_NAME)
    payload = {
        'version': FORMAT_VERSION,
        'source': source,
        'listed_at': time.time() if listed_at is None else listed_at,
        'objects': [(o.key, o.size, o.etag, o.mtime_ns) for o in objects],
    }
    tmp = f'{path}.tmp.{os.getpid()}'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, 'wb') as f:
            # Local file names need not be UTF-8: keep their bytes through surrogateescape.
            msgpack.pack(payload, f, use_bin_type=True, unicode_errors='surrogateescape')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_listing(folder, source):
    """Return (listed_at, [ObjectInfo]) or None when there is no usable saved listing."""
    path = os.path.join(folder, FILE_NAME)
    try:
        with open(path, 'rb') as f:
            payload = msgpack.unpack(f, raw=False, strict_map_key=False,
                                    unicode_errors='surrogateescape')
        if payload.get('version') != FORMAT_VERSION or payload.get('source') != source:
            log.info('ignoring saved listing %s: other version or source', path)
            return None
        objects = [ObjectInfo(key, size, etag, mtime_ns)
                   for key, size, etag, mtime_ns in payload['objects']]
        return float(payload['listed_at']), objects
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        log.warning('ignoring unreadable saved listing %s: %s', path, exc)
        return None
