"""The control protocol: how a cachefs command finds the daemon of a mount and asks it things.

The daemon answers extended attributes that `fuse/operations.py` serves:

    user.cachefs.pid     on the root folder: the daemon's process id
    user.cachefs.stats   on the root folder: its counters (JSON)
    user.cachefs.cached  on a file: how much of that file the cache holds (JSON)

and lists the store again on SIGHUP. Every command that talks to a daemon (umount, stats,
refresh, warmup, the benchmark's readers) goes through `open_mount` here, and nowhere else.

Why the checks. Any user can set `user.*` xattrs on a folder of their own, and an unprivileged
user can mount a FUSE file system of their own with subtype `cachefs` (fusermount3 allows it)
that answers whatever it likes. A root `cachefs refresh` that believed either would send SIGHUP
(which ends most programs) to a process of that user's choice. So before asking a mount
anything, a command checks what no user can forge:

1. the path lies on a mount of type `fuse.cachefs` in /proc/self/mountinfo (a plain folder with
   forged xattrs is not one);
2. the mount was made by the calling user or by root: the kernel records the mounting uid of
   every FUSE mount as its `user_id=` super option (fusermount3 fills in the real uid of its
   caller, so a user cannot claim root's);

and before using the pid that the mount answers:

3. that process runs as the same uid as the mount's owner and is a cachefs command for this
   mount point (its command line names cachefs and the mount point).

Anything else is `EXIT_NOT_MOUNTED` with one line. A dead mount (ENOTCONN: its daemon is gone)
passes 1 and 2 and can still be unmounted. Root does not control other users' mounts with
cachefs commands (umount(8) and fusermount3 still work on them).

Known limitation: the pid is that of the daemon's pid namespace; a daemon in another pid
namespace (a container) is controlled from inside that container.
"""

import errno
import json
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import EXIT_ACCESS, EXIT_NOT_MOUNTED, EXIT_USAGE, UserError
from .mounts import MOUNTINFO, MountEntry, mount_entries

log = logging.getLogger(__name__)

XATTR_PID = b'user.cachefs.pid'
XATTR_STATS = b'user.cachefs.stats'
XATTR_CACHED = b'user.cachefs.cached'     # on a file: how much of it the cache holds (JSON)

FSTYPE = 'fuse.cachefs'
PROC = '/proc'
_COMMAND_NAMES = ('cachefs', 'mount.cachefs')
# a FUSE mount whose daemon is gone answers ENOTCONN (ECONNABORTED while the kernel aborts it)
_DEAD = {errno.ENOTCONN, errno.ECONNABORTED}
_MISSING = {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP}


# -- /proc/self/mountinfo (mounts.py reads it): what the kernel says, which no user can forge --

def _is_under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip('/') + '/')


def mount_holding(path: str, entries: Iterable[MountEntry],
                  dev: tuple[int, int] | None = None) -> MountEntry | None:
    """The mount that `path` (absolute, symlinks resolved) lies on: the deepest mount point
    above it, the last one mounted where several share it. With `dev` (the path's st_dev as
    (major, minor)), only a mount of that device counts."""
    found = None
    for entry in entries:
        if not _is_under(path, entry.mountpoint) or (dev is not None and entry.dev != dev):
            continue
        if found is None or len(entry.mountpoint) >= len(found.mountpoint):
            found = entry
    return found


def owner_problem(entry: MountEntry | None, caller_uid: int) -> str | None:
    """Why the commands of `caller_uid` must not act on `entry` (None: they may). Pure logic."""
    if entry is None or entry.fstype != FSTYPE:
        return 'not a cachefs mount'
    owner = entry.owner_uid
    if owner is None:
        return 'not a cachefs mount (the kernel records no owner for it)'
    if owner not in (caller_uid, 0):
        return (f'a cachefs mount of uid {owner}; cachefs commands act only on mounts of their '
                'own user or of root')
    return None


# -- the daemon's process --

def _read_proc(pid: int, name: str, proc: str = PROC) -> bytes:
    with open(os.path.join(proc, str(pid), name), 'rb') as f:
        return f.read()


def process_uids(pid: int, proc: str = PROC) -> tuple[int, int]:
    """(real, effective) uid of a process."""
    for line in _read_proc(pid, 'status', proc).decode(errors='replace').splitlines():
        if line.startswith('Uid:'):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise ValueError(f'no Uid line in /proc/{pid}/status')


def _is_cachefs_command(argv: list[str]) -> bool:
    """`cachefs ...`, `mount.cachefs ...`, `python /usr/bin/cachefs ...`, `python -m cachefs`."""
    if any(os.path.basename(arg) in _COMMAND_NAMES for arg in argv[:2]):
        return True
    return any(a == '-m' and b == 'cachefs' for a, b in zip(argv, argv[1:]))


def _names_mountpoint(argv: list[str], mountpoint: str, cwd: str | None) -> bool:
    for arg in argv[1:]:
        if not arg or '://' in arg:
            continue
        if not os.path.isabs(arg):
            if cwd is None:
                continue
            arg = os.path.join(cwd, arg)
        if os.path.normpath(arg) == mountpoint or os.path.realpath(arg) == mountpoint:
            return True
    return False


def daemon_problem(pid: int, mountpoint: str, owner_uid: int | None,
                   proc: str = PROC) -> str | None:
    """Why process `pid` is not to be taken for the daemon of `mountpoint` (None: it is)."""
    try:
        uids = process_uids(pid, proc)
        argv = [arg.decode('utf-8', 'surrogateescape')
                for arg in _read_proc(pid, 'cmdline', proc).split(b'\0')[:-1]]
    except (OSError, ValueError):
        return f'its daemon (pid {pid}) is not running'
    if uids != (owner_uid, owner_uid):
        return f'pid {pid} runs as uid {uids[0]}, not as the owner of the mount (uid {owner_uid})'
    try:
        cwd = os.readlink(os.path.join(proc, str(pid), 'cwd'))
    except OSError:
        cwd = None          # another user's daemon: only absolute paths can be matched
    if not _is_cachefs_command(argv) or not _names_mountpoint(argv, mountpoint, cwd):
        return f'pid {pid} is not a cachefs daemon of {mountpoint}'
    return None


# -- a mount, checked --

def _not_mounted(path: str, problem: str) -> UserError:
    return UserError(f'{path} is {problem}', EXIT_NOT_MOUNTED)


def _dead_mount(path: str, mountpoint: str) -> UserError:
    return UserError(f'{path} is on a dead cachefs mount (its daemon is gone); clean it with: '
                     f'cachefs umount {mountpoint}', EXIT_NOT_MOUNTED)


class Mount:
    """A cachefs mount whose kernel record passed the checks (and, unless dead, its daemon)."""

    def __init__(self, path: str, entry: MountEntry, dead: bool = False) -> None:
        self.path = path                  # as the user gave it, for messages
        self.mountpoint = entry.mountpoint
        self.entry = entry
        self.owner_uid = entry.owner_uid
        self.dead = dead
        self._pid: int | None = None

    @contextmanager
    def _root(self) -> Iterator[int]:
        """An fd of the mount's root folder, checked to be on the mount's device: the path is
        looked up once, so nothing can be swapped in between the check and the question."""
        try:
            fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._unreachable(exc) from None
        try:
            st = os.fstat(fd)
            if (os.major(st.st_dev), os.minor(st.st_dev)) != self.entry.dev:
                raise _not_mounted(self.path, 'not a cachefs mount (it changed while checked)')
            yield fd
        finally:
            os.close(fd)

    def _unreachable(self, exc: OSError) -> UserError:
        if exc.errno in _DEAD:
            self.dead = True
            return _dead_mount(self.path, self.mountpoint)
        return _not_mounted(self.path, f'not a live cachefs mount ({exc.strerror})')

    def _ask(self, name: bytes) -> bytes:
        with self._root() as fd:
            try:
                return os.getxattr(fd, name)
            except OSError as exc:
                raise self._unreachable(exc) from None

    def daemon_pid(self) -> int:
        """The daemon's pid, once checked to be a cachefs daemon of this mount, of its owner."""
        if self._pid is None:
            try:
                pid = int(self._ask(XATTR_PID))
            except ValueError:
                raise _not_mounted(self.path, 'not a cachefs mount (its pid is garbled)') from None
            problem = daemon_problem(pid, self.mountpoint, self.owner_uid)
            if problem:
                raise _not_mounted(self.path, f'not a cachefs mount that can be trusted: '
                                   f'{problem}')
            self._pid = pid
        return self._pid

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (a dict)."""
        self.daemon_pid()
        try:
            return json.loads(self._ask(XATTR_STATS))
        except ValueError:
            raise _not_mounted(self.path, 'not a cachefs mount (its stats are garbled)') from None

    def request_refresh(self) -> None:
        """Ask the daemon to list the store again (SIGHUP)."""
        pid = self.daemon_pid()
        try:
            os.kill(pid, signal.SIGHUP)
        except PermissionError:
            raise UserError(f'no permission to signal the daemon of {self.mountpoint} (pid '
                            f'{pid}): run as its user or root', EXIT_ACCESS) from None
        except ProcessLookupError:
            raise _not_mounted(self.path, 'a cachefs mount whose daemon just exited') from None


def open_mount(path: str, inside: bool = False, allow_dead: bool = False,
               caller_uid: int | None = None, mountinfo: str = MOUNTINFO) -> Mount:
    """The checked cachefs mount at `path` (or, with `inside`, the one holding it), else a
    one-line UserError: EXIT_NOT_MOUNTED, or EXIT_USAGE for a path that does not exist. A dead
    mount is returned (with `dead` set) only when `allow_dead`."""
    caller_uid = os.geteuid() if caller_uid is None else caller_uid
    absolute = os.path.abspath(path)
    dev, dead = None, False
    try:
        st = os.stat(absolute)
        dev = (os.major(st.st_dev), os.minor(st.st_dev))
    except OSError as exc:
        if exc.errno in _MISSING:
            raise UserError(f'{path}: {exc.strerror}', EXIT_USAGE) from None
        # a dead mount; or one that refuses us (another user's FUSE mount answers root EACCES):
        # its kernel record below says which, and what may be done with it
        dead = exc.errno in _DEAD
    real = os.path.realpath(absolute)
    entry = mount_holding(real, mount_entries(mountinfo), dev)
    what = 'inside a cachefs mount' if inside else 'a cachefs mount'
    if entry is None or entry.fstype != FSTYPE:
        raise _not_mounted(path, f'not {what}')
    problem = owner_problem(entry, caller_uid)
    if problem:
        raise _not_mounted(path, problem)
    if not inside and entry.mountpoint != real:
        raise _not_mounted(path, f'not a cachefs mount (it is inside the cachefs mount '
                           f'{entry.mountpoint})')
    mount = Mount(path, entry, dead)
    if not dead:
        try:
            mount.daemon_pid()
        except UserError:
            if not (mount.dead and allow_dead):
                raise
    if mount.dead and not allow_dead:
        raise _dead_mount(path, entry.mountpoint)
    return mount


def cached_state(path: str) -> dict[str, int]:
    """{'size', 'blocks', 'cached_blocks', 'cached_bytes'} of one file of a checked mount."""
    return json.loads(os.getxattr(path, XATTR_CACHED))
