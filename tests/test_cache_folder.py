"""The cache folder: refused when someone else could write in it (they could plant blocks that the
mount would serve), created private whatever the umask, held by one daemon at a time, and a full
cache disk at mount degrades to store reads instead of refusing the mount.

The daemon runs as root here (tests chown folders to uid 65534, `nobody`, to play the other user).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs import errors
from cachefs.cache.disk import SUFFIX, TEMP_TAG, block_name, scan, write_block_file
from cachefs.cache.folder import check_trusted
from cachefs.cache.listing import FILE_NAME, save_listing
from cachefs.daemon import source_folder_name
from cachefs.ufs import parse_source
from cachefs.ufs.base import ObjectInfo
from conftest import (BLOCK_SIZE, Mounted, Source, assert_tree_matches, clean_env, drop_page_cache,
                      is_mounted, pid_alive, run_cachefs, small_dataset, wait_for_disk_writes,
                      wait_until, write_tree)

pytestmark = pytest.mark.fuse

OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason='playing another user needs root')


@pytest.fixture
def small_source(tmp_path):
    """A local source of its own: three multi-block files and a small one."""
    root = tmp_path / 'src'
    manifest = write_tree(root, small_dataset(seed='cache-folder'))
    return Source('local', str(root), [], clean_env(), manifest, root)


def source_folder(cache_dir, source):
    return Path(cache_dir) / source_folder_name(parse_source(source.url), None)


def refused_mount(mounter, source, mountpoint, cache_dir):
    result = run_cachefs('mount', source.url, mountpoint, '--cache-dir', cache_dir,
                         '--block-size', BLOCK_SIZE, env=source.env)
    if result.returncode == 0:          # a wrong success: leave nothing mounted
        mounter.mounted.append(Mounted(Path(mountpoint), int(os.getxattr(
            mountpoint, 'user.cachefs.pid')), Path(cache_dir), None))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_CACHE, result.stderr
    assert len(lines) == 1 and lines[0].startswith('cachefs: error: '), lines
    assert not is_mounted(mountpoint)
    return lines[0]


def read_manifest(root, manifest):
    return {relpath: (os.path.getsize(Path(root) / relpath),
                      hashlib.sha256((Path(root) / relpath).read_bytes()).hexdigest())
            for relpath in manifest}


# -- trust: who may write in the cache folder --

def test_folders_cachefs_creates_are_0700_whatever_the_umask(small_source, tmp_path):
    """Missing parents, the cache folder, the per-source folder and blocks/, under umask 000."""
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    cache = tmp_path / 'new' / 'deeper' / 'cache'
    command = [sys.executable, '-m', 'cachefs', 'mount', small_source.url, str(mountpoint),
               '--cache-dir', str(cache), '--block-size', str(BLOCK_SIZE)]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True,
                            timeout=60, umask=0)
    assert result.returncode == 0, result.stderr
    try:
        assert (mountpoint / 'shard-0.bin').read_bytes() == \
            (small_source.local_root / 'shard-0.bin').read_bytes()
        folder = source_folder(cache, small_source)
        for path in (tmp_path / 'new', tmp_path / 'new' / 'deeper', cache, folder,
                     folder / 'blocks'):
            assert path.stat().st_mode & 0o7777 == 0o700, path
    finally:
        assert run_cachefs('umount', mountpoint).returncode == 0


@needs_root
def test_cache_folder_owned_by_another_user_is_refused(small_source, tmp_path, mounter):
    cache = tmp_path / 'cache'
    cache.mkdir(mode=0o700)
    os.chown(cache, OTHER_UID, OTHER_UID)
    (tmp_path / 'mnt').mkdir()
    line = refused_mount(mounter, small_source, tmp_path / 'mnt', cache)
    assert str(cache) in line and f'uid {OTHER_UID}' in line


def test_parent_writable_by_others_without_the_sticky_bit_is_refused(small_source, tmp_path,
                                                                    mounter):
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(shared, 0o777)         # what an emptyDir volume is in Kubernetes
    (tmp_path / 'mnt').mkdir()
    line = refused_mount(mounter, small_source, tmp_path / 'mnt', shared / 'cache')
    assert str(shared) in line and '0777' in line and 'sticky' in line
    assert not (shared / 'cache').exists()       # nothing created in an untrusted folder


def test_parent_writable_by_others_with_the_sticky_bit_is_accepted(small_source, tmp_path,
                                                                   mounter):
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(shared, 0o1777)        # like /tmp
    mounted = mounter.mount(small_source, cache_dir=shared / 'cache')
    assert_tree_matches(mounted.path, small_source.manifest)


def test_cache_folder_writable_by_its_group_is_refused(small_source, tmp_path, mounter):
    cache = tmp_path / 'cache'
    cache.mkdir()
    os.chmod(cache, 0o770)
    (tmp_path / 'mnt').mkdir()
    line = refused_mount(mounter, small_source, tmp_path / 'mnt', cache)
    assert str(cache) in line and '0770' in line


@needs_root
def test_per_source_folder_owned_by_another_user_is_refused(small_source, tmp_path, mounter):
    """In a sticky shared cache folder, another user can make the per-source folder first."""
    cache = tmp_path / 'cache'
    cache.mkdir()
    os.chmod(cache, 0o1777)
    folder = source_folder(cache, small_source)
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    (tmp_path / 'mnt').mkdir()
    line = refused_mount(mounter, small_source, tmp_path / 'mnt', cache)
    assert str(folder) in line and f'uid {OTHER_UID}' in line


def plant(folder, source, key, data):
    """What a user who can write in the cache folder does: a listing and block files made with
    cachefs's own functions, so every checksum passes."""
    etag = 'planted'
    save_listing(str(folder), str(parse_source(source.url)),
                 [ObjectInfo(key, len(data), etag, 0)])
    for index in range((len(data) + BLOCK_SIZE - 1) // BLOCK_SIZE):
        path = folder / 'blocks' / block_name((key, etag, index), BLOCK_SIZE)
        write_block_file(str(path), (key, etag, index),
                         data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])


@needs_root
def test_blocks_planted_by_another_user_are_never_served(small_source, tmp_path, mounter):
    cache = tmp_path / 'cache'
    folder = source_folder(cache, small_source)
    (folder / 'blocks').mkdir(parents=True)
    plant(folder, small_source, 'shard-0.bin', b'planted weights ' * 1000)
    for path in [cache, *cache.rglob('*')]:
        os.chown(path, OTHER_UID, OTHER_UID)
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    line = refused_mount(mounter, small_source, mountpoint, cache)
    assert str(cache) in line
    assert os.listdir(mountpoint) == []


def test_the_sidecar_manifest_makes_its_emptydir_cache_folder_private_before_mounting(tmp_path):
    """An emptyDir volume is created 0777: the sidecar's own script must make it acceptable."""
    yaml = pytest.importorskip('yaml', reason='PyYAML comes with kubernetes-validate (test extra)')
    manifest = Path(__file__).parent.parent / 'deploy' / 'sidecar' / 'training-job.yaml'
    pod = yaml.safe_load(manifest.read_text())['spec']['template']['spec']
    sidecar = next(c for c in pod['initContainers'] if c['name'] == 'cachefs')
    volume = next(v for v in pod['volumes'] if 'emptyDir' in v and v['name'] in
                  {m['name'] for m in sidecar['volumeMounts'] if 'cachefs' in m['mountPath']})
    cache_path = next(m['mountPath'] for m in sidecar['volumeMounts']
                      if m['name'] == volume['name'])
    script = ' '.join(sidecar['command'][2:] + sidecar['args'])
    before_mount = script[:script.index('exec cachefs mount')]
    assert f'--cache-dir {cache_path} ' in script
    empty_dir = tmp_path / 'empty-dir'
    empty_dir.mkdir()
    os.chmod(empty_dir, 0o777)              # what the kubelet makes
    with pytest.raises(errors.UserError):
        check_trusted(str(empty_dir))
    # the script up to the mount, on a folder here, with a stub for `cachefs umount`
    stub = tmp_path / 'bin' / 'cachefs'
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nexit 0\n')
    stub.chmod(0o755)
    subprocess.run(['sh', '-c', before_mount.replace(cache_path, str(empty_dir))], check=True,
                   env=dict(os.environ, PATH=f'{stub.parent}:{os.environ["PATH"]}'))
    check_trusted(str(empty_dir))


# -- one daemon per per-source folder --

def test_second_mount_of_the_same_source_and_cache_folder_is_refused_and_the_first_serves_on(
        small_source, tmp_path, mounter):
    mounted = mounter.mount(small_source)
    other = tmp_path / 'other'
    other.mkdir()
    line = refused_mount(mounter, small_source, other, mounted.cache_dir)
    assert str(source_folder(mounted.cache_dir, small_source)) in line
    assert f'pid {mounted.pid}' in line and str(mounted.path) in line
    assert_tree_matches(mounted.path, small_source.manifest)
    assert pid_alive(mounted.pid)
    # the lock is held by a close-on-exec fd: a program the daemon ran would not hold it on
    lock = source_folder(mounted.cache_dir, small_source) / 'lock'
    fds = [fd for fd in os.listdir(f'/proc/{mounted.pid}/fd')
           if os.readlink(f'/proc/{mounted.pid}/fd/{fd}') == str(lock)]
    assert len(fds) == 1
    flags = Path(f'/proc/{mounted.pid}/fdinfo/{fds[0]}').read_text().split('flags:')[1].split()[0]
    assert int(flags, 8) & os.O_CLOEXEC


def test_scan_removes_leftovers_named_with_our_own_pid_and_keeps_our_writes(tmp_path):
    """Pids repeat across containers (the daemon is often pid 1): a leftover with this process's
    pid is still a leftover; only names with this process's TEMP_TAG are writes under way."""
    sub = tmp_path / 'ab'
    sub.mkdir()
    leftovers = [sub / f'x{SUFFIX}.tmp{os.getpid()}-456', sub / f'y{SUFFIX}.tmp1-7',
                 sub / f'z{SUFFIX}.tmp{os.getpid()}.0123456789ab-8']
    ours = sub / f'w{SUFFIX}{TEMP_TAG}99'
    for path in leftovers + [ours]:
        path.write_bytes(b'half')
    assert scan(str(tmp_path)) == []
    assert sorted(sub.iterdir()) == [ours]


def test_leftovers_of_an_earlier_container_with_the_same_pid_are_removed(small_source,
                                                                           tmp_path):
    """The daemon runs as pid 1 of its own pid namespace, as in a container, and finds the temp
    files that an earlier pid 1 left behind: it removes them all."""
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    cache = tmp_path / 'cache'
    folder = source_folder(cache, small_source)
    (folder / 'blocks' / 'ab').mkdir(parents=True)
    block_leftover = folder / 'blocks' / 'ab' / f'{"ab" * 16}{SUFFIX}.tmp1-123'
    listing_leftover = folder / f'{FILE_NAME}.tmp.1'
    for path in (block_leftover, listing_leftover):
        path.write_bytes(b'half')
    log_file = tmp_path / 'daemon.log'
    # --kill-child: when unshare dies (terminate() below), the daemon gets SIGTERM
    daemon = subprocess.Popen(
        ['unshare', '--pid', '--fork', '--kill-child=SIGTERM', sys.executable, '-m', 'cachefs',
         'mount', '--foreground', small_source.url, str(mountpoint), '--cache-dir', str(cache),
         '--block-size', str(BLOCK_SIZE), '--log-file', str(log_file), '--log-level', 'debug'],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answering():
            try:
                return os.getxattr(mountpoint, 'user.cachefs.pid')
            except OSError:
                return None
        assert wait_until(answering), log_file.read_text() if log_file.exists() else ''
        assert answering() == b'1'          # the same pid as the daemon that left them
        stats = {}
        assert wait_until(lambda: stats.update(read_stats(mountpoint)) or
                          stats['disk_index_ready'])
        assert not block_leftover.exists() and not listing_leftover.exists()
        assert (mountpoint / 'shard-1.bin').read_bytes() == \
            (small_source.local_root / 'shard-1.bin').read_bytes()
    finally:
        # never `cachefs umount` here: it would signal pid 1 of *our* namespace
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if not wait_until(lambda: not is_mounted(mountpoint), timeout=10):
            subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)


def read_stats(mountpoint):
    return json.loads(os.getxattr(mountpoint, 'user.cachefs.stats'))


# -- a full cache disk at mount --

@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs with 64 inodes, unmounted in teardown."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    disk = tmp_path / 'small-disk'
    disk.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m,nr_inodes=64,mode=0700', 'tmpfs',
                    str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(['umount', '-l', str(disk)], check=False)


def fill_bytes(disk):
    with open(disk / 'filler', 'wb') as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass


def fill_inodes(disk):
    for i in range(1000):
        try:
            (disk / f'inode-{i}').touch()
        except OSError:
            return
    raise AssertionError('the tmpfs did not run out of inodes')


def cache_disk_warnings(log_file):
    return [line for line in Path(log_file).read_text().splitlines()
            if ' WARNING ' in line and 'cache disk' in line]


def test_cache_disk_full_at_mount_serves_its_blocks_and_reads_the_rest_from_the_store(
        small_source, mounter, small_tmpfs):
    options = ('--memory-cache-size', '0', '--prefetch-window', '0')
    mounted = mounter.mount(small_source, *options, cache_dir=small_tmpfs)
    expected = (small_source.local_root / 'shard-0.bin').read_bytes()
    assert (mounted.path / 'shard-0.bin').read_bytes() == expected
    wait_for_disk_writes(mounted)
    mounter.umount(mounted)

    fill_bytes(small_tmpfs)
    drop_page_cache()
    mounted = mounter.mount(small_source, *options, cache_dir=small_tmpfs, name='again')
    assert read_manifest(mounted.path, small_source.manifest) == small_source.manifest
    stats = mounted.stats()
    assert stats['disk_hits'] >= 3                # shard-0's blocks, cached before the disk filled
    assert pid_alive(mounted.pid)
    assert len(cache_disk_warnings(mounted.log_file)) == 1, mounted.log_file.read_text()


def test_cache_disk_without_room_for_a_folder_mounts_without_an_ssd_tier(small_source, mounter,
                                                                         small_tmpfs):
    fill_inodes(small_tmpfs)
    mounted = mounter.mount(small_source, cache_dir=small_tmpfs)
    assert read_manifest(mounted.path, small_source.manifest) == small_source.manifest
    stats = mounted.stats()
    assert stats['disk_capacity_bytes'] == 0 and stats['disk_writes'] == 0
    assert len(cache_disk_warnings(mounted.log_file)) == 1, mounted.log_file.read_text()
