"""Every mistake a user will make gets one line naming the problem, a documented exit code, and
leaves nothing mounted."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from cachefs import errors
from conftest import OSS_BUCKET, S3_BUCKET, clean_env, is_mounted, run_cachefs

pytestmark = pytest.mark.fuse


def assert_fails_cleanly(result, exit_code, *words, mountpoint=None):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('cachefs: error: '), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert 'Traceback' not in result.stderr
    assert result.returncode == exit_code, (result.returncode, lines[0])
    if mountpoint is not None:
        assert not is_mounted(mountpoint)


@pytest.fixture
def empty_dir(tmp_path):
    path = tmp_path / 'mnt'
    path.mkdir()
    return path


def mount(source_url, mountpoint, tmp_path, *args, env=None):
    return run_cachefs('mount', source_url, mountpoint, '--cache-dir', tmp_path / 'cache',
                       '--retry-timeout', '2s', '--request-timeout', '2s', *args,
                       env=env or clean_env())


def test_unknown_scheme(empty_dir, tmp_path):
    result = mount('gs://bucket/prefix', empty_dir, tmp_path)
    assert_fails_cleanly(result, errors.EXIT_USAGE, "'gs'", mountpoint=empty_dir)


def test_malformed_bucket_name(empty_dir, tmp_path):
    result = mount('s3:///prefix', empty_dir, tmp_path)
    assert_fails_cleanly(result, errors.EXIT_USAGE, 'bucket', mountpoint=empty_dir)


def test_bad_option_value(local_source, empty_dir, tmp_path):
    result = mount(local_source.url, empty_dir, tmp_path, '-o', 'block_size=lots')
    assert_fails_cleanly(result, errors.EXIT_USAGE, 'lots', mountpoint=empty_dir)


def test_unknown_dash_o_option(local_source, empty_dir, tmp_path):
    result = mount(local_source.url, empty_dir, tmp_path, '-o', 'no_such_thing=1')
    assert_fails_cleanly(result, errors.EXIT_USAGE, 'no_such_thing', mountpoint=empty_dir)


def test_local_folder_absent(empty_dir, tmp_path):
    result = mount(str(tmp_path / 'nothing-here'), empty_dir, tmp_path)
    assert_fails_cleanly(result, errors.EXIT_SOURCE_MISSING, 'nothing-here', mountpoint=empty_dir)


def test_s3_bucket_absent(s3_source, empty_dir, tmp_path):
    result = mount('s3://no-such-bucket-here/x', empty_dir, tmp_path, *s3_source.args,
                   env=s3_source.env)
    assert_fails_cleanly(result, errors.EXIT_SOURCE_MISSING, 'no-such-bucket-here',
                         mountpoint=empty_dir)


def test_s3_prefix_absent(s3_source, empty_dir, tmp_path):
    result = mount(f's3://{S3_BUCKET}/no/such/prefix', empty_dir, tmp_path, *s3_source.args,
                   env=s3_source.env)
    assert_fails_cleanly(result, errors.EXIT_SOURCE_MISSING, 'no/such/prefix',
                         mountpoint=empty_dir)


def test_oss_bucket_absent(oss_source, empty_dir, tmp_path):
    result = mount('oss://no-such-bucket-here/x', empty_dir, tmp_path, *oss_source.args,
                   env=oss_source.env)
    assert_fails_cleanly(result, errors.EXIT_SOURCE_MISSING, 'no-such-bucket-here',
                         mountpoint=empty_dir)


def test_oss_prefix_absent(oss_source, empty_dir, tmp_path):
    result = mount(f'oss://{OSS_BUCKET}/no/such/prefix', empty_dir, tmp_path, *oss_source.args,
                   env=oss_source.env)
    assert_fails_cleanly(result, errors.EXIT_SOURCE_MISSING, 'no/such/prefix',
                         mountpoint=empty_dir)


def test_s3_credentials_missing(s3_source, empty_dir, tmp_path):
    result = mount(s3_source.url, empty_dir, tmp_path, *s3_source.args, env=clean_env())
    assert_fails_cleanly(result, errors.EXIT_ACCESS, 'credentials', mountpoint=empty_dir)


def test_s3_credentials_rejected(s3_source, empty_dir, tmp_path):
    env = dict(s3_source.env, AWS_SECRET_ACCESS_KEY='wrong-secret-4242')
    result = mount(s3_source.url, empty_dir, tmp_path, *s3_source.args, env=env)
    assert_fails_cleanly(result, errors.EXIT_ACCESS, 'access denied', mountpoint=empty_dir)
    assert 'wrong-secret-4242' not in result.stderr


def test_oss_credentials_missing(oss_source, empty_dir, tmp_path):
    result = mount(oss_source.url, empty_dir, tmp_path, *oss_source.args, env=clean_env())
    assert_fails_cleanly(result, errors.EXIT_ACCESS, 'OSS_ACCESS_KEY_ID', mountpoint=empty_dir)


def test_oss_credentials_rejected(oss_source, empty_dir, tmp_path):
    env = dict(oss_source.env, OSS_ACCESS_KEY_SECRET='wrong-secret-4242')
    result = mount(oss_source.url, empty_dir, tmp_path, *oss_source.args, env=env)
    assert_fails_cleanly(result, errors.EXIT_ACCESS, 'access denied', mountpoint=empty_dir)
    assert 'wrong-secret-4242' not in result.stderr


def test_oss_without_endpoint(empty_dir, tmp_path):
    env = clean_env(OSS_ACCESS_KEY_ID='a', OSS_ACCESS_KEY_SECRET='b')
    result = mount('oss://bucket/prefix', empty_dir, tmp_path, env=env)
    assert_fails_cleanly(result, errors.EXIT_USAGE, '--endpoint-url', mountpoint=empty_dir)


@pytest.mark.parametrize('scheme', ['s3', 'oss'])
def test_endpoint_not_reachable(scheme, empty_dir, tmp_path):
    env = clean_env(AWS_ACCESS_KEY_ID='a', AWS_SECRET_ACCESS_KEY='b', OSS_ACCESS_KEY_ID='a',
                    OSS_ACCESS_KEY_SECRET='b')
    # port 9 (discard) on loopback: nothing listens there, so the connection is refused
    result = mount(f'{scheme}://bucket/prefix', empty_dir, tmp_path, '--endpoint-url',
                   'http://127.0.0.1:9', env=env)
    assert_fails_cleanly(result, errors.EXIT_STORE, 'connect', mountpoint=empty_dir)


def test_mount_point_missing(local_source, tmp_path):
    result = mount(local_source.url, tmp_path / 'absent', tmp_path)
    assert_fails_cleanly(result, errors.EXIT_MOUNTPOINT, 'does not exist')


def test_mount_point_is_a_file(local_source, tmp_path):
    (tmp_path / 'file').write_text('x')
    result = mount(local_source.url, tmp_path / 'file', tmp_path)
    assert_fails_cleanly(result, errors.EXIT_MOUNTPOINT, 'not a directory')


def test_mount_point_not_empty(local_source, empty_dir, tmp_path):
    (empty_dir / 'something').write_text('x')
    result = mount(local_source.url, empty_dir, tmp_path)
    assert_fails_cleanly(result, errors.EXIT_MOUNTPOINT, 'not empty', mountpoint=empty_dir)


def test_already_mounted(local_source, mounter, tmp_path):
    mounted = mounter.mount(local_source)
    result = mount(local_source.url, mounted.path, tmp_path)
    assert_fails_cleanly(result, errors.EXIT_MOUNTPOINT, 'already')
    assert is_mounted(mounted.path)     # the first mount is untouched


@pytest.mark.skipif(not shutil.which('unshare'), reason='needs unshare(1)')
def test_no_fuse_device(local_source, empty_dir, tmp_path):
    # In a private mount namespace, /dev/fuse is covered by a plain file.
    fake = tmp_path / 'not-a-device'
    fake.write_text('')
    command = (f'mount --bind {fake} /dev/fuse && exec {sys.executable} -m cachefs mount '
               f'{local_source.url} {empty_dir} --cache-dir {tmp_path / "cache"}')
    result = subprocess.run(['unshare', '-m', '--propagation', 'private', 'sh', '-c', command],
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert_fails_cleanly(result, errors.EXIT_FUSE, '/dev/fuse', mountpoint=empty_dir)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('setpriv') or not shutil.which('unshare'),
                    reason='needs root, setpriv and unshare')
def test_no_permission_on_fuse_device(local_source, empty_dir, tmp_path):
    # In a private mount namespace, /dev/fuse is replaced by a FUSE device node with mode 000,
    # and the process runs without the capabilities that let root ignore file modes.
    device = tmp_path / 'fuse'
    os.mknod(device, 0o000 | stat.S_IFCHR, os.makedev(10, 229))
    os.chmod(device, 0)
    command = (f'mount --bind {device} /dev/fuse && exec setpriv --bounding-set '
               f'-dac_override,-dac_read_search {sys.executable} -m cachefs mount '
               f'{local_source.url} {empty_dir} --cache-dir {tmp_path / "cache"}')
    result = subprocess.run(['unshare', '-m', '--propagation', 'private', 'sh', '-c', command],
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert_fails_cleanly(result, errors.EXIT_FUSE, 'permission', mountpoint=empty_dir)


def test_umount_of_a_folder_that_is_not_a_mount(empty_dir):
    result = run_cachefs('umount', empty_dir)
    assert_fails_cleanly(result, errors.EXIT_NOT_MOUNTED, 'not a cachefs mount')
