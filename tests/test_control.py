"""The control commands (umount, stats, refresh, warmup) act only on a real cachefs mount of the
calling user or root, served by a cachefs daemon of that mount: a forged folder or a forged FUSE
mount gets exit 9 and no process is ever signalled on its word."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cachefs import errors
from conftest import clean_env, fuse_available, is_mounted, pid_alive, run_cachefs

needs_root_fuse = pytest.mark.skipif(os.geteuid() != 0 or not fuse_available(),
                                     reason='needs root and /dev/fuse')

# A process that a forged mount names as "the daemon": it records every SIGHUP it receives.
VICTIM = '''
import signal, sys, time
def hangup(*_):
    with open(sys.argv[1], 'a') as f:
        f.write('SIGHUP\\n')
signal.signal(signal.SIGHUP, hangup)
print('ready', flush=True)
while True:
    time.sleep(1)
'''

# A FUSE file system that calls itself cachefs (subtype=cachefs) and answers the control
# xattrs with the victim's pid. With a uid argument, it mounts with that real uid (the kernel
# records it as user_id=), as an unprivileged user's own FUSE mount would be.
FORGED_FS = '''
import errno, json, os, stat, sys
import pyfuse3, trio
mountpoint, victim, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if uid:
    os.setresgid(uid, 0, 0)
    os.setresuid(uid, 0, 0)
STATS = json.dumps({'pid': victim, 'listing_generation': 0, 'files': 0, 'dataset_bytes': 0,
                    'disk_writes_pending': 0}).encode()
class Forged(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2
        return attrs
    async def lookup(self, parent, name, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)
    async def opendir(self, inode, ctx):
        return inode
    async def readdir(self, fh, start, token):
        return
    async def releasedir(self, fh):
        return
    async def getxattr(self, inode, name, ctx):
        if name == b'user.cachefs.pid':
            return str(victim).encode()
        if name == b'user.cachefs.stats':
            return STATS
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
# allow_other (what /etc/fuse.conf's user_allow_other grants users): else root gets EACCES
pyfuse3.init(Forged(), mountpoint, set(pyfuse3.default_options) | {
    'fsname=forged', 'subtype=cachefs', 'ro', 'allow_other'})
print('ready', flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=True)
'''

COMMANDS = {
    'refresh': lambda path: run_cachefs('refresh', path, '--timeout', '3'),
    'stats': lambda path: run_cachefs('stats', path),
    'umount': lambda path: run_cachefs('umount', path, '--timeout', '3'),
    'warmup': lambda path: run_cachefs('warmup', path),
}


def start(script, *args):
    process = subprocess.Popen([sys.executable, '-c', script, *map(str, args)],
                               stdout=subprocess.PIPE, text=True, env=clean_env())
    assert process.stdout.readline().strip() == 'ready'
    return process


def stop(process):
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


@pytest.fixture
def victim(tmp_path):
    """(pid, file where its SIGHUPs are recorded) of a process nobody may signal."""
    record = tmp_path / 'hangups'
    process = start(VICTIM, record)
    try:
        yield process, record
    finally:
        stop(process)


def assert_untouched(victim):
    process, record = victim
    time.sleep(0.2)         # a signal sent just before the command exited is delivered by now
    assert process.poll() is None and pid_alive(process.pid)
    assert not record.exists(), record.read_text()


def assert_refused(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_NOT_MOUNTED, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith('cachefs: error: '), result.stderr


def forge_folder(folder, pid):
    folder.mkdir(exist_ok=True)
    (folder / 'shard.bin').write_bytes(b'x' * 100)
    os.setxattr(folder, 'user.cachefs.pid', str(pid).encode())
    os.setxattr(folder, 'user.cachefs.stats', json.dumps(
        {'pid': pid, 'listing_generation': 0, 'files': 1, 'dataset_bytes': 100}).encode())
    os.setxattr(folder / 'shard.bin', 'user.cachefs.cached', json.dumps(
        {'size': 100, 'blocks': 1, 'cached_blocks': 0, 'cached_bytes': 0}).encode())


# -- forged folders and mounts --

@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_a_folder_with_forged_control_xattrs_is_refused_and_nobody_is_signalled(
        command, victim, tmp_path):
    folder = tmp_path / 'forged'
    forge_folder(folder, victim[0].pid)
    assert_refused(COMMANDS[command](folder))
    assert_untouched(victim)


@pytest.fixture(params=['another user', 'root'])
def forged_mount(request, victim, tmp_path):
    """A FUSE mount of subtype cachefs, answering the victim's pid: made by another user
    (nobody: user_id=65534), or by root but served by a process that is no cachefs daemon."""
    mountpoint = tmp_path / 'forged-mnt'
    mountpoint.mkdir()
    uid = 65534 if request.param == 'another user' else 0
    process = start(FORGED_FS, mountpoint, victim[0].pid, uid)
    try:
        yield mountpoint, uid
    finally:
        stop(process)
        if is_mounted(mountpoint):
            subprocess.run(['umount', '-l', str(mountpoint)], check=False)


@needs_root_fuse
@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_a_forged_fuse_mount_of_subtype_cachefs_is_refused_and_nobody_is_signalled(
        command, forged_mount, victim):
    mountpoint, uid = forged_mount
    assert f',user_id={uid},' in mountinfo_line(mountpoint)
    result = COMMANDS[command](mountpoint)
    assert_refused(result)
    reason = 'mounts of their own user or of root' if uid else 'not a cachefs daemon'
    assert reason in result.stderr, result.stderr
    assert is_mounted(mountpoint)
    assert_untouched(victim)


def mountinfo_line(path):
    with open('/proc/self/mountinfo') as f:
        return next(line for line in f if line.split()[4] == str(path))


# -- the real mount still answers every command --

@pytest.mark.fuse
def test_every_control_command_works_on_a_real_mount(local_source, mounter):
    mounted = mounter.mount(local_source)
    stats = run_cachefs('stats', '--json', mounted.path)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)['pid'] == mounted.pid
    refresh = run_cachefs('refresh', mounted.path)
    assert refresh.returncode == 0 and refresh.stdout.startswith('refreshed: '), refresh.stderr
    warmup = run_cachefs('warmup', mounted.path / 'special')
    assert warmup.returncode == 0, warmup.stderr
    umount = run_cachefs('umount', mounted.path)
    assert umount.returncode == 0, umount.stderr
    assert not is_mounted(mounted.path) and not pid_alive(mounted.pid)


@pytest.mark.fuse
def test_a_dead_mount_is_still_cleaned_up_by_umount(local_source, mounter):
    mounted = mounter.mount(local_source)
    os.kill(mounted.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(mounted.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError) as dead:
        os.listdir(mounted.path)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert_refused(run_cachefs('stats', mounted.path))
    result = run_cachefs('umount', mounted.path)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mounted.path)


@pytest.mark.fuse
def test_umount_of_a_busy_mount_exits_10_and_leaves_it_mounted(local_source, mounter):
    mounted = mounter.mount(local_source)
    with open(mounted.path / 'one_byte.bin', 'rb'):
        result = run_cachefs('umount', mounted.path)
        assert result.returncode == errors.EXIT_BUSY, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and 'busy' in result.stderr
        assert is_mounted(mounted.path) and pid_alive(mounted.pid)
    assert run_cachefs('umount', mounted.path).returncode == 0
    assert not is_mounted(mounted.path)


@pytest.mark.fuse
def test_stats_of_a_folder_inside_a_mount_names_the_mount_point(local_source, mounter):
    mounted = mounter.mount(local_source)
    result = run_cachefs('stats', mounted.path / 'special')
    assert_refused(result)
    assert f'inside the cachefs mount {mounted.path}' in result.stderr


# -- the decisions, on crafted /proc data (pure logic) --

def line(mountpoint='/mnt/data', fstype='fuse.cachefs', super_options='ro,user_id=0,group_id=0'):
    return (f'42 23 0:39 / {mountpoint} ro,nosuid,nodev,relatime - {fstype} '
            f'cachefs:s3://bucket {super_options}\n')


def test_mountinfo_lines_are_parsed_with_their_escapes_and_owner():
    from cachefs.mounts import parse_mountinfo_line
    entry = parse_mountinfo_line(line(mountpoint=r'/mnt/my\040data',
                                      super_options='ro,user_id=1000,group_id=1000'))
    assert entry.mountpoint == '/mnt/my data'
    assert (entry.fstype, entry.dev, entry.owner_uid) == ('fuse.cachefs', (0, 39), 1000)


@pytest.mark.parametrize('fstype, super_options, caller, allowed', [
    ('fuse.cachefs', 'ro,user_id=0,group_id=0', 0, True),          # root's mount, root
    ('fuse.cachefs', 'ro,user_id=0,group_id=0', 1000, True),       # root's mount, a user
    ('fuse.cachefs', 'ro,user_id=1000,group_id=1000', 1000, True),  # one's own mount
    ('fuse.cachefs', 'ro,user_id=1000,group_id=1000', 0, False),   # a user's mount, root
    ('fuse.cachefs', 'ro,user_id=1000,group_id=1000', 1001, False),  # another user's
    ('fuse.cachefs', 'ro,group_id=0', 0, False),                   # no owner recorded
    ('fuse.sshfs', 'ro,user_id=0,group_id=0', 0, False),           # not cachefs
    ('ext4', 'rw', 0, False),
])
def test_only_cachefs_mounts_of_the_caller_or_root_are_controlled(fstype, super_options, caller,
                                                                   allowed):
    from cachefs.control import owner_problem
    from cachefs.mounts import parse_mountinfo_line
    entry = parse_mountinfo_line(line(fstype=fstype, super_options=super_options))
    assert (owner_problem(entry, caller) is None) == allowed


def fake_proc(tmp_path, pid, uid, argv, cwd='/'):
    folder = tmp_path / 'proc' / str(pid)
    folder.mkdir(parents=True)
    (folder / 'status').write_text(f'Name:\tpython3\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n')
    (folder / 'cmdline').write_bytes(b''.join(arg.encode() + b'\0' for arg in argv))
    (folder / 'cwd').symlink_to(cwd)
    return str(tmp_path / 'proc')


@pytest.mark.parametrize('uid, argv, cwd, trusted', [
    (0, ['/usr/bin/python3', '-m', 'cachefs', 'mount', '--foreground', 's3://b', '/mnt/data'],
     '/', True),
    (0, ['/usr/bin/python3', '/usr/local/bin/cachefs', 'mount', 's3://b', '/mnt/data', '-f'],
     '/', True),
    (0, ['/usr/local/bin/cachefs', 'mount', 's3://b', 'data', '-f'], '/mnt', True),
    (0, ['/sbin/mount.cachefs', 's3://b', '/mnt/data', '-o', 'foreground'], '/', True),
    (1000, ['/usr/bin/python3', '-m', 'cachefs', 'mount', 's3://b', '/mnt/data'], '/', False),
    (0, ['/usr/bin/python3', '-m', 'cachefs', 'mount', 's3://b', '/mnt/other'], '/', False),
    (0, ['/usr/sbin/sshd', '-D', '/mnt/data'], '/', False),
    (0, ['sleep', '1000'], '/', False),
])
def test_the_pid_a_mount_names_must_be_a_cachefs_daemon_of_it_run_by_its_owner(
        tmp_path, uid, argv, cwd, trusted):
    from cachefs.control import daemon_problem
    proc = fake_proc(tmp_path, 4242, uid, argv, cwd)
    assert (daemon_problem(4242, '/mnt/data', 0, proc=proc) is None) == trusted


def test_a_pid_that_does_not_run_is_no_daemon(tmp_path):
    from cachefs.control import daemon_problem
    (tmp_path / 'proc').mkdir()
    assert 'not running' in daemon_problem(4242, '/mnt/data', 0, proc=str(tmp_path / 'proc'))
