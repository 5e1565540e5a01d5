"""The cache folder on disk: trusted before use, created private, held by one daemon at a time.

Trust. Blocks and the saved listing are served without asking the store, so whoever can write in
the cache folder decides what the mount serves (a planted block made with cachefs's own functions
passes every checksum). The rule is ssh's StrictModes with /tmp's exception: the cache folder and
every folder above it, up to /, must be owned by root or by the daemon's user, and must not be
writable by group or others unless the sticky bit is set (there others can add names but not
replace ours). The per-source folder and its blocks/ folder must be owned by the daemon's user.
Anything else is refused with one line (exit code 8) before a byte is read from the folder.
The check is made on the real path (symlinks resolved), and the daemon then uses only that path.

Creation. Folders cachefs creates (missing parents too) are 0700 whatever the umask.

Lock. One daemon per per-source folder: two would each claim the whole capacity and evict each
other's blocks. The daemon takes an exclusive flock on `<per-source folder>/lock` and holds it for
its life (the fd is close-on-exec; the kernel drops the lock when the process dies, even by
SIGKILL). The file names the holder's pid and mount point, for the second mount's message.
Because the lock holder is the only writer, every temporary file found in the folder at start is
a leftover of an earlier daemon and may be removed (see `disk.scan`).

Known limits: POSIX ACLs are not read (a folder whose ACL grants writes to others passes); flock
is advisory and local to one machine (a cache folder on NFS shared by two machines is not
protected).
"""

import errno
import fcntl
import logging
import os
import pwd
import stat

from ..errors import EXIT_CACHE, UserError

log = logging.getLogger(__name__)

LOCK_NAME = 'lock'
# writes that fail because the disk is full: the SSD tier then starts with admission paused
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(OSError):
    """The cache disk has no room for even a folder or a small file."""


def _owner(uid):
    try:
        return f'uid {uid} ({pwd.getpwuid(uid).pw_name})'
    except KeyError:
        return f'uid {uid}'


def _refuse(path, cause):
    raise UserError(f'cache folder {path}: {cause}; refusing it, since whoever can write there '
                    'decides what the mount serves', EXIT_CACHE)


def _check_one(path, st, euid):
    if not stat.S_ISDIR(st.st_mode):
        _refuse(path, 'not a folder')
    if st.st_uid not in (0, euid):
        _refuse(path, f'{path} is owned by {_owner(st.st_uid)}, not by root or the daemon\'s '
                      f'user ({_owner(euid)})')
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        _refuse(path, f'{path} is writable by group or others (mode '
                      f'{stat.S_IMODE(st.st_mode):04o}) without the sticky bit')


def check_trusted(path):
    """Refuse `path` (absolute, symlinks resolved) unless it and every parent are trusted."""
    euid = os.geteuid()
    chain = [path]
    while chain[-1] != os.path.dirname(chain[-1]):
        chain.append(os.path.dirname(chain[-1]))
    for folder in reversed(chain):       # from / down, so that the message names the highest
        try:
            st = os.lstat(folder)
        except OSError as exc:
            raise UserError(f'cache folder {path}: {folder}: {exc.strerror}', EXIT_CACHE) from None
        _check_one(folder, st, euid)


def make_trusted_folder(path):
    """Create `path` and its missing parents 0700 after checking the parents that exist; return
    its real path, checked."""
    path = os.path.realpath(path)
    missing = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    check_trusted(existing)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)      # a umask can only take bits away, but take none here
        except FileExistsError:
            pass                         # made meanwhile: the check below judges it
        except OSError as exc:
            raise UserError(f'cache folder {folder}: {exc.strerror}', EXIT_CACHE) from None
    check_trusted(path)
    return path


def own_private_folder(path):
    """Create `path` 0700 (not its parents) or check that it is a folder of the daemon's user
    (not a symlink), and make it 0700. Raises `DiskFull` when it cannot be created for lack of
    space."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise DiskFull(exc.errno, exc.strerror) from None
        raise UserError(f'cache folder {path}: {exc.strerror}', EXIT_CACHE) from None
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            _refuse(path, 'not a folder (a symlink or a file)')
        if st.st_uid != os.geteuid():
            _refuse(path, f'owned by {_owner(st.st_uid)}, not by the daemon\'s user '
                          f'({_owner(os.geteuid())})')
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise UserError(f'cache folder {path}: {exc.strerror}', EXIT_CACHE) from None


class CacheFolder:
    """The per-source folder, checked. `disk_full`: the disk had no room for a small write (the
    SSD tier then starts admitting nothing). `locked`: this daemon holds the folder's lock; only
    then may it use the SSD tier (not when a full disk left no room for the lock file)."""

    def __init__(self, path, lock_fd, disk_full):
        self.path = path
        self.lock_fd = lock_fd
        self.disk_full = disk_full

    @property
    def locked(self):
        return self.lock_fd is not None


def _lock(folder, mountpoint):
    """Take the folder's lock for the life of this process; returns the fd.

    The fd held is read-only: a file open for writing would keep the cache disk from being
    remounted read-only (EBUSY) while the daemon runs. flock needs no write access."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise DiskFull(exc.errno, exc.strerror) from None
        raise UserError(f'cache folder {folder}: cannot open its lock file: {exc.strerror}',
                        EXIT_CACHE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace').split(' ', 1)
        except OSError:
            holder = []
        os.close(fd)
        who = (f'pid {holder[0]}, mounted on {holder[1].strip()}' if len(holder) == 2
               else 'pid unknown')
        raise UserError(f'cache folder {folder} is in use by another cachefs ({who}); mount the '
                        'same source twice only with another --cache-dir', EXIT_CACHE) from None
    try:
        writer = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.write(writer, f'{os.getpid()} {mountpoint}\n'.encode('utf-8', 'surrogateescape'))
        finally:
            os.close(writer)     # the lock stays with `fd`
    except OSError as exc:
        # the lock is held; only the message of a second mount loses its details
        log.debug('could not write the holder into %s: %s', path, exc)
    return fd


def _remove_leftovers(folder):
    """Temporary files of an earlier daemon's listing saves and probes (we hold the lock: none
    is ours)."""
    for entry in os.scandir(folder):
        leftover = '.tmp' in entry.name or entry.name.startswith('.probe.')
        if leftover and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError as exc:
                log.debug('could not remove %s: %s', entry.path, exc)


def _probe_full(folder):
    """True when the folder's disk refuses a small write for lack of space; other errors (a
    read-only disk, permissions) refuse the mount."""
    probe = os.path.join(folder, f'.probe.{os.getpid()}')
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b'ok')
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            return True
        raise UserError(f'cache folder {folder}: {exc.strerror}', EXIT_CACHE) from None
    return False


def prepare(cache_dir, name, mountpoint):
    """Check, create and lock `<cache_dir>/<name>`; returns a `CacheFolder`."""
    root = make_trusted_folder(cache_dir)
    folder = os.path.join(root, name)
    try:
        own_private_folder(folder)
        lock_fd = _lock(folder, mountpoint)
    except DiskFull:
        return CacheFolder(folder, None, True)
    _remove_leftovers(folder)
    return CacheFolder(folder, lock_fd, _probe_full(folder))
