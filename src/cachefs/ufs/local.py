"""A local folder as a store: the embedded default for demos and tests, and NFS/Lustre mounts.

The ETag is derived from inode, mtime and size, so a file rewritten in place gets a new version
and its old cached blocks are never served for it. Reads check the version before and after
reading, so a file changed during a read fails with `ObjectChanged` instead of mixing bytes.
"""

import errno
import logging
import os
import stat

from .base import ObjectInfo, Store
from .errors import AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, StoreError

log = logging.getLogger(__name__)


def _etag(st):
    return f'{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}'


def _translate(exc, what):
    if exc.errno == errno.ENOENT:
        return ObjectNotFound(f'{what}: not found')
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f'{what}: permission denied')
    return StoreError(f'{what}: {os.strerror(exc.errno or errno.EIO)}')


class LocalStore(Store):
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.source = 'file://' + self.root

    def _path(self, key):
        return os.path.join(self.root, key)

    def list_objects(self):
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise _translate(exc, self.root) from None
        yield from self._walk(self.root, '', frozenset({(st.st_dev, st.st_ino)}))

    def _walk(self, folder, key_prefix, ancestors):
        # `ancestors`: the (device, inode) of every folder on the way here, so that a link back
        # to one of them (`ln -s .. loop`) is skipped instead of walked 40 levels deep (and
        # 2**40 times with two such links).
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise _translate(exc, folder) from None
        if not entries and key_prefix:
            yield ObjectInfo(key_prefix, 0, '', 0)   # an empty folder is kept as a marker
        for entry in entries:
            key = key_prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                log.warning('skipping %s: cannot stat it (dangling link?)', entry.path)
                continue
            if stat.S_ISDIR(st.st_mode):
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    log.warning('skipping %s: a link back to a folder that contains it',
                                entry.path)
                    continue
                yield from self._walk(entry.path, key + '/', ancestors | {identity})
            elif stat.S_ISREG(st.st_mode):
                yield ObjectInfo(key, st.st_size, _etag(st), st.st_mtime_ns)

    def read(self, key, etag, offset, length):
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _translate(exc, key) from None
        try:
            if _etag(os.fstat(fd)) != etag:
                raise ObjectChanged(f'{key}: changed since it was listed')
            data = os.pread(fd, length, offset)
            if _etag(os.fstat(fd)) != etag:
                raise ObjectChanged(f'{key}: changed while being read')
        except OSError as exc:
            raise _translate(exc, key) from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise ObjectChanged(f'{key}: shorter than listed')
        return data

    def stat(self, key):
        try:
            st = os.stat(self._path(key))
        except OSError as exc:
            raise _translate(exc, key) from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f'{key}: not a regular file')
        return ObjectInfo(key, st.st_size, _etag(st), st.st_mtime_ns)

    def check_access(self):
        try:
            if not os.path.isdir(self.root):
                raise BucketNotFound(f'{self.root}: no such directory')
            return bool(os.listdir(self.root))
        except OSError as exc:
            raise _translate(exc, self.root) from None
