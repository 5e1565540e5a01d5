"""The kernel side of a mount: checks before mounting, tuning after, and unmounting.

Nothing here knows about stores or caches; it deals with mount points, /dev/fuse, sysfs knobs
and /proc/self/mountinfo.
"""

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field

from .errors import EXIT_BUSY, EXIT_FUSE, EXIT_MOUNTPOINT, EXIT_NOT_MOUNTED, UserError

log = logging.getLogger(__name__)

FUSE_DEVICE = '/dev/fuse'
FUSECTL_DIR = '/sys/fs/fuse/connections'


MOUNTINFO = '/proc/self/mountinfo'
_OCTAL_ESCAPE = re.compile(rb'\\([0-7]{3})')


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mountpoint: str
    fstype: str
    source: str
    dev_major: int             # as os.stat() reports st_dev for files on it
    dev_minor: int
    root: str = '/'            # the folder of the file system mounted here ('/' unless a bind)
    super_options: dict = field(default_factory=dict)

    @property
    def dev(self):
        return (self.dev_major, self.dev_minor)

    @property
    def owner_uid(self):
        """The uid that made this FUSE mount (its `user_id=` super option), or None."""
        value = self.super_options.get('user_id', '')
        return int(value) if value.isdigit() else None


def _unescape(text):
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]),
                            text.encode('utf-8', 'surrogateescape'))
    return raw.decode('utf-8', 'surrogateescape')


def parse_mountinfo_line(line):
    left, _, right = line.rstrip('\n').partition(' - ')
    fields = left.split(' ')
    fstype, source, options = (right.split(' ') + ['', ''])[:3]
    major, minor = fields[2].split(':')
    super_options = dict(item.partition('=')[::2] for item in options.split(',') if item)
    return MountEntry(_unescape(fields[4]), fstype, _unescape(source), int(major), int(minor),
                      _unescape(fields[3]), super_options)


def mount_entries(path=MOUNTINFO):
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        return [parse_mountinfo_line(line) for line in f if ' - ' in line]


def find_mount(path):
    """The topmost mount whose mount point is `path`, or None."""
    path = os.path.abspath(path)
    found = None
    for entry in mount_entries():
        if entry.mountpoint == path:
            found = entry
    return found


def _dead_mount(path):
    return UserError(f'mount point {path} holds a dead FUSE mount (transport endpoint not '
                     f'connected); clean it with: cachefs umount {path}', EXIT_MOUNTPOINT)


def check_mountpoint(path):
    """Raise `UserError` unless `path` is an existing, empty folder that nothing is mounted on."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f'mount point {path} does not exist', EXIT_MOUNTPOINT) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(path) from None
        raise UserError(f'mount point {path}: {exc.strerror}', EXIT_MOUNTPOINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f'mount point {path} is not a directory', EXIT_MOUNTPOINT)
    entry = find_mount(path)
    if entry is not None:
        # stat() of a dead FUSE mount can be answered from the kernel's attribute cache;
        # statvfs() always asks the daemon, and a dead one answers ENOTCONN.
        try:
            os.statvfs(path)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise _dead_mount(path) from None
        raise UserError(f'{path} is already a mount point ({entry.fstype} from {entry.source})',
                        EXIT_MOUNTPOINT)
    try:
        if os.listdir(path):
            raise UserError(f'mount point {path} is not empty', EXIT_MOUNTPOINT)
    except PermissionError:
        raise UserError(f'mount point {path}: permission denied', EXIT_MOUNTPOINT) from None


def check_fuse_device():
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        raise UserError(f'{FUSE_DEVICE} does not exist: load the fuse module or, in a container, '
                        'pass the device (--device /dev/fuse)', EXIT_FUSE) from None
    if not stat.S_ISCHR(st.st_mode):
        raise UserError(f'{FUSE_DEVICE} is not the FUSE character device', EXIT_FUSE)
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise UserError(f'no permission to open {FUSE_DEVICE} (run as root or add the user to '
                        'the group that owns it)', EXIT_FUSE)
    if os.geteuid() != 0 and not shutil.which('fusermount3'):
        raise UserError('fusermount3 not found: install the fuse3 package', EXIT_FUSE)


def _write_sysfs(path, value):
    try:
        with open(path, 'w') as f:
            f.write(str(value))
        return True
    except OSError as exc:
        log.info('could not set %s to %s: %s', path, value, exc.strerror)
        return False


def tune_kernel(mountpoint, read_ahead_bytes, max_background):
    """Raise the mount's readahead and the connection's max_background (root only).

    A FUSE mount starts with read_ahead_kb=128 (128 KiB requests) and max_background=12; the
    measurements in DESIGN.md show 4 MiB readahead doubling throughput and halving CPU per MiB.
    """
    if os.geteuid() != 0:
        log.info('not root: leaving readahead and max_background at the kernel defaults')
        return
    st_dev = os.stat(mountpoint).st_dev
    major, minor = os.major(st_dev), os.minor(st_dev)
    _write_sysfs(f'/sys/class/bdi/{major}:{minor}/read_ahead_kb', max(read_ahead_bytes // 1024, 4))
    if not os.path.isdir(FUSECTL_DIR) or not os.listdir(FUSECTL_DIR):
        # fusectl is not always mounted (containers); mounting it is harmless when allowed.
        subprocess.run(['mount', '-t', 'fusectl', 'fusectl', FUSECTL_DIR],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    # fusectl names a connection by the kernel's internal dev_t (major << 20 | minor), which
    # differs from the st_dev encoding userspace sees once minor >= 256.
    connection = os.path.join(FUSECTL_DIR, str((major << 20) | minor))
    if os.path.isdir(connection):
        # congestion_threshold must not exceed max_background: set max_background first.
        _write_sysfs(os.path.join(connection, 'max_background'), max_background)
        _write_sysfs(os.path.join(connection, 'congestion_threshold'),
                     max(max_background * 3 // 4, 1))
    else:
        log.info('fusectl connection %s not found: max_background left as is', connection)


def unmount(path, lazy=False):
    """Unmount a FUSE mount (also a dead one); raises `UserError` when it stays mounted:
    EXIT_BUSY while files are open in it, else EXIT_NOT_MOUNTED."""
    message = 'neither fusermount3 nor umount is installed'
    for command in (['fusermount3', '-u'] + (['-z'] if lazy else []) + [path],
                    ['umount'] + (['-l'] if lazy else []) + [path]):
        if not shutil.which(command[0]):
            continue
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''
        # fusermount3 says "Device or resource busy", umount(8) "target is busy"
        if 'busy' in message.lower():
            raise UserError(f'cannot unmount {path}: it is busy (files are open in it or a '
                            f'process works in it; see fuser -vm {path})', EXIT_BUSY)
    raise UserError(f'cannot unmount {path}: {message}', EXIT_NOT_MOUNTED)
