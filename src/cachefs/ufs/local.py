"""A local folder as a store: the embedded default for demos and tests, and NFS/Lustre mounts.

Versions. The ETag is derived from inode, size, mtime and ctime, so a file rewritten in place gets
a new version and its old cached blocks are never served for it: even when the writer restores
the mtime (`os.utime`, `touch -r`, `rsync -t`), the ctime changes, and no user can set it back.
Reads check the version before and after reading, so a file changed since it was listed, or during
a read, fails with `ObjectChanged` (EIO) instead of mixing bytes of two versions.

Symbolic links. A link whose target stays inside the source folder is served as its target. A link
that leads outside it is skipped at listing (logged once per listing, with a count): otherwise a
daemon run as root with `--allow-other` would serve any file that a user can link into the source
(`ln -s /etc/shadow`). The same holds at read time, whatever was swapped in after the listing (a
file replaced by such a link, a folder by a link to `/`): every read checks, on the file it has
opened, that the real path of that file is inside the source folder.

Known limits: a hard link is the file itself, wherever it was made, so a hard link to a file
outside the source is served (the kernel's `fs.protected_hardlinks`, on by default, keeps users
from hard-linking files they cannot read); and a bind mount inside the source folder is served,
as a deliberate choice of whoever mounted it.
"""

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator

from .base import ObjectInfo, Store
from .errors import AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, StoreError

log = logging.getLogger(__name__)

# A FIFO swapped in for a listed file must not block the open (and a thread) forever.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_PROC_FD = '/proc/self/fd'


def _etag(st: os.stat_result) -> str:
    return f'{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ctime_ns:x}'


def _legacy_etag(st: os.stat_result) -> str:
    # The form before ctime was part of the version; a listing saved by an older cachefs carries
    # it, and is honoured (with that version's weaker check) until the next listing replaces it.
    return f'{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}'


def _version(st: os.stat_result, etag: str) -> str:
    return _legacy_etag(st) if etag.count('-') == 2 else _etag(st)


def _translate(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOENT:
        return ObjectNotFound(f'{what!r}: not found')
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f'{what!r}: permission denied')
    return StoreError(f'{what!r}: {os.strerror(exc.errno or errno.EIO)}')


def _is_inside(path: str, root: str) -> bool:
    """Whether the real path `path` is `root` or under it (both already resolved)."""
    return path == root or path.startswith(root.rstrip('/') + '/')


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.source = 'file://' + self.root
        # The boundary links may not cross; the root itself may well be a link (/data -> /nfs/data).
        self.real_root = os.path.realpath(self.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def list_objects(self) -> Iterator[ObjectInfo]:
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise _translate(exc, self.root) from None
        self.real_root = os.path.realpath(self.root)
        outside: Counter[str] = Counter()
        yield from self._walk(self.root, '', frozenset({(st.st_dev, st.st_ino)}), outside)
        if outside:
            log.warning('skipped %d link(s) that lead outside the source folder %r, e.g. %r',
                        sum(outside.values()), self.real_root, next(iter(outside)))

    def _walk(self, folder: str, key_prefix: str, ancestors: frozenset[tuple[int, int]],
              outside: Counter[str]) -> Iterator[ObjectInfo]:
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
                if entry.is_symlink() and not _is_inside(os.path.realpath(entry.path),
                                                         self.real_root):
                    outside[entry.path] += 1
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError:
                log.warning('skipping %r: cannot stat it (dangling link?)', entry.path)
                continue
            if stat.S_ISDIR(st.st_mode):
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    log.warning('skipping %r: a link back to a folder that contains it',
                                entry.path)
                    continue
                yield from self._walk(entry.path, key + '/', ancestors | {identity}, outside)
            elif stat.S_ISREG(st.st_mode):
                yield ObjectInfo(key, st.st_size, _etag(st), st.st_mtime_ns)

    def _open(self, key: str) -> int:
        """An fd on the regular file `key`, only if it really lies inside the source folder."""
        try:
            fd = os.open(self._path(key), _OPEN_FLAGS)
        except OSError as exc:
            raise _translate(exc, key) from None
        try:
            # Checked on the open file itself, so a link swapped in between this check and the
            # read changes nothing: this fd is the file that will be read.
            if not _is_inside(self._real_path(fd, key), self.real_root):
                log.warning('refusing %r: it now leads outside the source folder %r', key,
                            self.real_root)
                raise ObjectChanged(f'{key!r}: now leads outside the source folder')
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _real_path(self, fd: int, key: str) -> str:
        try:
            # A deleted file reads as '/path (deleted)': inside or not, the version check fails.
            return os.readlink(f'{_PROC_FD}/{fd}')
        except OSError:
            pass
        # No /proc: resolve the path, and make sure that what it names now is the open file
        # (if a link was swapped since the open, the two differ and the read is refused).
        real = os.path.realpath(self._path(key))
        try:
            if os.path.samestat(os.stat(real), os.fstat(fd)):
                return real
        except OSError:
            pass
        return ''

    def read(self, key: str, etag: str, offset: int, length: int) -> bytes:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or _version(st, etag) != etag:
                raise ObjectChanged(f'{key!r}: changed since it was listed')
            data = os.pread(fd, length, offset)
            if _version(os.fstat(fd), etag) != etag:
                raise ObjectChanged(f'{key!r}: changed while being read')
        except OSError as exc:
            raise _translate(exc, key) from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise ObjectChanged(f'{key!r}: shorter than listed')
        return data

    def stat(self, key: str) -> ObjectInfo:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _translate(exc, key) from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f'{key!r}: not a regular file')
        return ObjectInfo(key, st.st_size, _etag(st), st.st_mtime_ns)

    def check_access(self) -> bool:
        try:
            if not os.path.isdir(self.root):
                raise BucketNotFound(f'{self.root}: no such directory')
            return bool(os.listdir(self.root))
        except OSError as exc:
            raise _translate(exc, self.root) from None
