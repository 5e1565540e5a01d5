"""The machine under the benchmark: page cache, process counters, mounts and cleanup.

Everything the benchmark starts (servers, FUSE daemons, mounts, reader pools) is registered with
`on_cleanup` the moment it exists, and `cleanup()` tears it down in reverse order. run.py calls
`cleanup()` in a `finally`; it is also registered with `atexit`, and SIGTERM/SIGHUP are turned
into `SystemExit` so that a killed run still unmounts. Processes are only ever signalled by the
PID we started (or that a daemon reported about itself), mounts only unmounted by their path.
"""

import atexit
import logging
import os
import shutil
import signal
import subprocess
import time

from cachefs.demo import pagecache

log = logging.getLogger(__name__)

_CLK_TCK = os.sysconf('SC_CLK_TCK')
_FUSECTL = '/sys/fs/fuse/connections'


# -- page cache --

def can_drop_page_cache():
    return os.geteuid() == 0


def drop_page_cache():
    """Drop the machine's page cache (see cachefs.demo.pagecache); False when not root. This
    also drops SeaweedFS's volume files: a cold read then really reads the disk."""
    if not can_drop_page_cache():
        return False
    return pagecache.drop_page_cache()


# -- process counters --

def process_times(pid):
    """(user CPU s, system CPU s, minor page faults) of a process and all its threads; None if
    it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            # The command name may hold spaces and parentheses: split after its last ')'.
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK, int(fields[7])


def cpu_seconds(pid):
    """User + system CPU seconds of a process and all its threads; None if it is gone."""
    times = process_times(pid)
    return None if times is None else times[0] + times[1]


def peak_rss_bytes(pid):
    """VmHWM: the process's peak resident set since it started; None if it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pid_alive(pid, name_hint=None):
    """True if `pid` runs and (with a hint) its command line mentions `name_hint`.

    The hint guards against a PID recycled by an unrelated process before we signal it.
    """
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmdline = f.read()
    except OSError:
        return False
    if not cmdline:  # a zombie: nothing left to stop
        return False
    return name_hint is None or name_hint.encode() in cmdline


def stop_pid(pid, name_hint, grace=10.0):
    """SIGTERM, wait up to `grace` seconds, then SIGKILL one process that we started."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid, name_hint):
            return True
        log.info('sending %s to %s pid %d', sig.name, name_hint, pid)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid, name_hint):
            time.sleep(0.05)
    return not pid_alive(pid, name_hint)


# -- mounts --

def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode('unicode_escape').encode('latin-1').decode('utf-8', 'replace')


def mount_entry(path):
    """(fstype, 'major:minor') of the topmost mount at `path`, or None."""
    path = os.path.abspath(path)
    found = None
    with open('/proc/self/mountinfo') as f:
        for line in f:
            left, _, right = line.partition(' - ')
            fields = left.split()
            if _unescape(fields[4]) == path:
                found = (right.split()[0], fields[2])
    return found


def is_mounted(path):
    return mount_entry(path) is not None


def mounts_under(path):
    """Mount points at or below `path`."""
    path = os.path.abspath(path)
    with open('/proc/self/mountinfo') as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p == path or p.startswith(path + '/')]


def wait_for_mount(path, proc, timeout):
    """Wait until a FUSE mount appears at `path`; raise if `proc` exits or time runs out.

    For daemons that we start in the foreground (s3fs -f, rclone mount): they have no
    "ready" signal, so the mount table is the signal.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = mount_entry(path)
        if entry and entry[0].startswith('fuse'):
            return
        if proc.poll() is not None:
            raise RuntimeError(f'exited with status {proc.returncode} before mounting {path}')
        time.sleep(0.05)
    raise RuntimeError(f'no mount at {path} after {timeout:.0f} s')


def abort_fuse_connection(path):
    """Abort the FUSE connection of the mount at `path`, so that no reader stays stuck on it.

    The last resort when a daemon hangs: every pending and future request fails with
    ENOTCONN, after which a lazy unmount always succeeds.
    """
    entry = mount_entry(path)
    if not entry or not entry[0].startswith('fuse'):
        return False
    major, minor = (int(x) for x in entry[1].split(':'))
    # fusectl names a connection by the kernel's dev_t (major << 20 | minor).
    abort = os.path.join(_FUSECTL, str((major << 20) | minor), 'abort')
    try:
        with open(abort, 'w') as f:
            f.write('1')
        log.warning('aborted the FUSE connection of %s', path)
        return True
    except OSError as exc:
        log.warning('could not abort the FUSE connection of %s: %s', path, exc)
        return False


def unmount(path, timeout=30.0):
    """Unmount the FUSE mount at `path` (and only that path); True once nothing is mounted there.

    A plain unmount first (retried while the mount is busy, e.g. a reader process that is still
    exiting); then the connection is aborted and the path lazily unmounted.
    """
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        for command in (['umount', path], ['fusermount3', '-u', path], ['fusermount', '-u', path]):
            if shutil.which(command[0]):
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60, check=False)
                if not is_mounted(path):
                    return True
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if is_mounted(path):
        abort_fuse_connection(path)
        subprocess.run(['umount', '-l', path], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
    return not is_mounted(path)


# -- cleanup registry --

_cleanups = {}
_next_token = 0


def on_cleanup(description, function):
    """Register `function` to run at cleanup; returns a token for `done`."""
    global _next_token
    _next_token += 1
    _cleanups[_next_token] = (description, function)
    return _next_token


def done(token):
    """The resource behind `token` was released normally: forget its cleanup."""
    _cleanups.pop(token, None)


def cleanup():
    """Release everything still registered, newest first; never raises.

    SIGTERM, SIGHUP and Ctrl-C are ignored meanwhile: a second signal must not leave a mount
    half torn down.
    """
    if not _cleanups:
        return
    ignored = {}
    if os.getpid() == _main_pid:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            ignored[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        _release_all()
    finally:
        for sig, handler in ignored.items():
            signal.signal(sig, handler)


def _release_all():
    for token in sorted(_cleanups, reverse=True):
        description, function = _cleanups.pop(token)
        log.info('cleanup: %s', description)
        try:
            function()
        except BaseException as exc:  # keep going: the next resource still has to be freed
            log.error('cleanup of %s failed: %s', description, exc)


_main_pid = None
_stop_signal = None


def _raise_exit(signum, frame):
    global _stop_signal
    if os.getpid() != _main_pid:
        # A forked reader that has not reset its handlers yet: it owns nothing, so it just dies
        # (raising here could be swallowed during fork bootstrap and leave it running).
        os._exit(128 + signum)
    # Remembered as well as raised: CPython swallows an exception raised while it runs an
    # at-fork hook (logging has one), and the next `check_stop` must still stop the run.
    _stop_signal = signum
    raise SystemExit(128 + signum)


def check_stop():
    """Raise SystemExit if a SIGTERM/SIGHUP arrived whose exception was swallowed."""
    if _stop_signal is not None:
        raise SystemExit(128 + _stop_signal)


def reset_signals_in_child():
    """In a forked child: default signal actions, so that the parent can always stop it."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def install_exit_handlers():
    """Make SIGTERM and SIGHUP unwind the stack (running every `finally`) like Ctrl-C does."""
    global _main_pid
    _main_pid = os.getpid()
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    atexit.register(cleanup)


def rmtree(path):
    """Remove a folder that the benchmark created; refuses (and says so) while a mount is inside."""
    if not os.path.exists(path):
        return
    busy = mounts_under(path)
    if busy:
        log.error('not removing %s: %s still mounted', path, ', '.join(busy))
        return
    shutil.rmtree(path, ignore_errors=True)
