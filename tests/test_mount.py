"""A mounted source is a byte-exact, read-only POSIX view of the store: local, S3 and OSS."""

import errno
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import (assert_tree_matches, clean_env, is_mounted, pid_alive, run_cachefs,
                      sha256_of, wait_until)

pytestmark = pytest.mark.fuse


def file_names(root):
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, _, files in os.walk(root) for name in files}


def test_whole_tree_matches_the_source_byte_for_byte(source, mounter):
    mounted = mounter.mount(source)
    assert file_names(mounted.path) == source.manifest.keys()
    assert_tree_matches(mounted.path, source.manifest)


def test_folders_match_the_source(source, mounter):
    mounted = mounter.mount(source)
    found = {os.path.relpath(folder, mounted.path) for folder, _, _ in os.walk(mounted.path)}
    if source.name == 'local':
        expected = {os.path.relpath(folder, source.local_root)
                    for folder, _, _ in os.walk(source.local_root)}
    else:   # an object store has no empty folders unless a marker object says so
        expected = {'.'} | {os.path.dirname(path)[:i] for path in source.manifest
                            for i, c in enumerate(os.path.dirname(path) + '/') if c == '/' and i}
    assert found == expected


def test_random_offset_reads_return_the_source_bytes(source, mounter):
    mounted = mounter.mount(source)
    rng = random.Random(3)
    big = max(source.manifest, key=lambda p: source.manifest[p][0])
    expected = (source.local_root / big).read_bytes()
    with open(mounted.path / big, 'rb') as f:
        for _ in range(200):
            offset = rng.randrange(0, len(expected) + 100)
            length = rng.choice([1, 17, 4096, 131072, 1 << 20, 3 << 20])
            assert os.pread(f.fileno(), length, offset) == expected[offset:offset + length]


def test_files_are_read_only_and_owned_by_the_daemon_user(source, mounter):
    mounted = mounter.mount(source)
    st = os.stat(mounted.path / next(iter(source.manifest)))
    assert st.st_mode & 0o777 == 0o444
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert os.stat(mounted.path).st_mode & 0o777 == 0o555


@pytest.mark.parametrize('operation', [
    lambda m, f: open(m / 'new-file', 'w'),
    lambda m, f: open(m / f, 'r+b'),
    lambda m, f: open(m / f, 'ab'),
    lambda m, f: os.unlink(m / f),
    lambda m, f: os.mkdir(m / 'new-folder'),
    lambda m, f: os.rename(m / f, m / 'renamed'),
    lambda m, f: os.truncate(m / f, 0),
    lambda m, f: os.chmod(m / f, 0o777),
    lambda m, f: os.utime(m / f, (0, 0)),
    lambda m, f: os.symlink(f, m / 'link'),
    lambda m, f: os.link(m / f, m / 'hardlink'),
    lambda m, f: os.setxattr(m / f, 'user.x', b'1'),
], ids=['create', 'open-rw', 'append', 'unlink', 'mkdir', 'rename', 'truncate', 'chmod', 'utime',
        'symlink', 'link', 'setxattr'])
def test_every_write_operation_fails_with_erofs(local_source, mounter, operation):
    mounted = mounter.mount(local_source)
    some_file = next(p for p in local_source.manifest if local_source.manifest[p][0])
    with pytest.raises(OSError) as raised:
        operation(mounted.path, some_file)
    assert raised.value.errno == errno.EROFS


def test_umount_leaves_nothing_mounted_or_running(source, mounter):
    mounted = mounter.mount(source)
    mounter.umount(mounted)
    assert not is_mounted(mounted.path)
    assert not pid_alive(mounted.pid)
    assert os.listdir(mounted.path) == []


def test_metadata_requests_after_mount_never_reach_the_store(remote_source, mounter):
    mounted = mounter.mount(remote_source)
    before = remote_source.request_count()
    for _ in range(2):
        for folder, dirs, files in os.walk(mounted.path):
            for name in files + dirs:
                os.stat(os.path.join(folder, name))
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / 'no-such-file')
    os.statvfs(mounted.path)
    assert remote_source.request_count() == before


def test_remount_reuses_the_saved_listing_without_listing_again(remote_source, mounter):
    mounter.umount(mounter.mount(remote_source))
    before = remote_source.request_count()
    mounted = mounter.mount(remote_source)
    assert file_names(mounted.path) == remote_source.manifest.keys()
    assert remote_source.request_count() == before


def test_metadata_ttl_zero_lists_the_store_again_at_mount(s3_source, mounter):
    mounter.umount(mounter.mount(s3_source))
    before = s3_source.request_count()
    mounter.mount(s3_source, '--metadata-ttl', '0')
    assert s3_source.request_count() > before


def test_cache_folder_is_private_to_the_daemon_user(local_source, mounter):
    mounted = mounter.mount(local_source)
    folders = list(mounted.cache_dir.iterdir())
    assert len(folders) == 1
    assert folders[0].stat().st_mode & 0o777 == 0o700
    for path in folders[0].iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o600, path


def test_stats_count_store_traffic_and_hits(local_source, mounter):
    mounted = mounter.mount(local_source)
    big = max(local_source.manifest, key=lambda p: local_source.manifest[p][0])
    for _ in range(2):
        (mounted.path / big).read_bytes()
    stats = mounted.stats()
    assert stats['store_bytes'] >= local_source.manifest[big][0]
    assert stats['misses'] > 0


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_foreground_mount_unmounts_cleanly_on_signal(local_source, tmp_path, signum):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    daemon = subprocess.Popen([sys.executable, '-m', 'cachefs', 'mount', '--foreground',
                               local_source.url, str(mountpoint), '--cache-dir',
                               str(tmp_path / 'cache')], env=clean_env(),
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: is_mounted(mountpoint)), 'the mount did not appear'
        assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(local_source.local_root))
        daemon.send_signal(signum)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
        assert not is_mounted(mountpoint)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if is_mounted(mountpoint):
            subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)


def test_mount_helper_takes_fstab_style_options(local_source, tmp_path):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    helper = os.path.join(os.path.dirname(sys.executable), 'mount.cachefs')
    result = subprocess.run([helper, local_source.url, str(mountpoint), '-o',
                             f'ro,nodev,_netdev,cache_dir={tmp_path / "cache"},'
                             'entry_timeout=1h,block_size=2M'],
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        some_file = next(p for p in local_source.manifest if local_source.manifest[p][0])
        assert sha256_of(mountpoint / some_file) == local_source.manifest[some_file][1]
    finally:
        run_cachefs('umount', mountpoint)
    assert not is_mounted(mountpoint)
