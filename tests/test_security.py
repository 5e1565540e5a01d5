"""What the mount exposes and to whom: keys that are not POSIX paths never escape the mount or
crash it, the mount and the cache are private to the daemon's user, and credentials never reach
a log, the stats, the metrics, an error message or a command line.

Covered elsewhere and not repeated: every write fails with EROFS (test_mount), the cache folder
and block files modes (test_mount, test_cache; here: ownership, every folder, a permissive
umask).
"""

import errno
import os
import stat
import subprocess
import sys
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefs import errors
from cachefs.config import MOUNT_OPTIONS
from conftest import (OSS_KEY_ID, OSS_SECRET, Mounted, Source, clean_env, free_port, is_mounted,
                      pid_alive, run_cachefs, small_dataset, wait_for_disk_writes, write_tree)
from support.faults import Always, ByName, FaultProxy, call_within
from support.oss_server import OssServer

pytestmark = pytest.mark.fuse

BUCKET = 'cachefs-security'
NAME_MAX = 255


# -- names the store allows and POSIX does not --

def expected_view(keys):
    """The tree README's "What the mount shows" promises for `keys`: {relative path: 'dir' or
    'file'}. Written independently of namespace.py, from the README's rules."""
    dirs, files = set(), set()
    for key in keys:
        if key in ('', '/'):
            continue
        parts = key[:-1].split('/') if key.endswith('/') else key.split('/')
        if '\0' in key or any(p in ('', '.', '..') or len(p.encode('utf-8', 'surrogateescape'))
                              > NAME_MAX for p in parts):
            continue                            # skipped, logged once per kind
        dirs.update('/'.join(parts[:i]) for i in range(1, len(parts)))
        (dirs if key.endswith('/') else files).add('/'.join(parts))
    view = {path: 'file' for path in files - dirs}  # object and prefix: the folder wins
    view.update({path: 'dir' for path in dirs})
    return view


def mounted_view(root):
    view = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames:
            view[os.path.relpath(os.path.join(folder, name), root)] = 'dir'
        for name in filenames:
            view[os.path.relpath(os.path.join(folder, name), root)] = 'file'
    return view


def assert_nothing_escapes(mounted, view):
    """Every entry is a plain file or folder inside the mount (no links, nothing resolving
    elsewhere), and the mount's parent and the mount point itself are what they were."""
    root = os.path.realpath(mounted.path)
    for relpath, kind in view.items():
        path = os.path.join(root, relpath)
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) if kind == 'dir' else stat.S_ISREG(st.st_mode), relpath
        assert os.path.realpath(path).startswith(root + '/'), relpath
    assert os.path.realpath(os.path.join(root, '..')) == str(Path(root).parent)
    assert pid_alive(mounted.pid)
    assert is_mounted(mounted.path)


def skipped_lines(mounted):
    return [line for line in mounted.log_file.read_text().splitlines()
            if 'skipped' in line and 'key(s)' in line]


def test_odd_s3_keys_are_shown_or_skipped_as_documented(seaweed, mounter):
    """SeaweedFS refuses "." and ".." segments and names over 255 bytes, and normalises "a//b",
    leading "/" and "\\" itself; what it stores is shown by the README's rules."""
    prefix = f'names-{uuid.uuid4().hex[:8]}/'
    seaweed.create_bucket(BUCKET)
    client = seaweed.client(retries={'max_attempts': 0})
    wanted = {'ctl\x01\x1f.bin': b'control', 'tab\tand\nnewline': b'whitespace',
              'del\x7f': b'delete', 'both': b'object and folder', 'both/child': b'child',
              'a//b': b'double slash', 'trail/': b'marker with content', '//lead': b'lead',
              'back\\slash': b'backslash', 'sp ace %41+#?': b'specials', 'ok': b'ok',
              'x/./y': b'dot', 'x/../../escape': b'dotdot', '../escape': b'up', '.': b'dot',
              'n' * 300: b'long', 'ok-' + 'n' * 252: b'255 bytes'}
    refused = set()
    for key, data in wanted.items():
        try:
            client.put_object(Bucket=BUCKET, Key=prefix + key, Body=data)
        except client.exceptions.ClientError:
            refused.add(key)
    stored = [o['Key'][len(prefix):] for o in
              client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get('Contents', [])]
    print(f'\nSeaweedFS refused {sorted(refused)!r}; stored {sorted(stored)!r}')
    env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                    AWS_DEFAULT_REGION='us-east-1')
    source = Source('s3', f's3://{BUCKET}/{prefix}', ['--endpoint-url', seaweed.endpoint], env,
                    {}, Path('/nonexistent'))
    mounted = mounter.mount(source)
    view = mounted_view(mounted.path)
    assert view == expected_view(stored)
    assert view['both'] == 'dir' and view['both/child'] == 'file'
    assert view['ctl\x01\x1f.bin'] == 'file' and view['tab\tand\nnewline'] == 'file'
    assert_nothing_escapes(mounted, view)
    for relpath, kind in view.items():
        if kind == 'file':
            key = relpath
            assert (mounted.path / relpath).read_bytes() == client.get_object(
                Bucket=BUCKET, Key=prefix + key)['Body'].read(), relpath


@pytest.fixture
def private_oss(tmp_path):
    server = OssServer(str(tmp_path / 'oss-data'), {OSS_KEY_ID: OSS_SECRET}).start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def oss_source(server, prefix='data'):
    env = clean_env(OSS_ACCESS_KEY_ID=OSS_KEY_ID, OSS_ACCESS_KEY_SECRET=OSS_SECRET)
    return Source('oss', f'oss://{BUCKET}/{prefix}', ['--endpoint-url', server.endpoint], env,
                  {}, Path('/nonexistent'), extra={'server': server})


def test_keys_that_are_not_posix_paths_never_escape_or_crash_the_mount(private_oss, mounter):
    """The OSS test server stores keys verbatim: every kind of bad key reaches cachefs."""
    bad = {
        '.': 'empty/dot segment', '..': 'empty/dot segment', 'x/./y': 'empty/dot segment',
        'x/../y': 'empty/dot segment', '../escape': 'empty/dot segment',
        '../../../../etc/passwd': 'empty/dot segment', '/absolute': 'empty/dot segment',
        'a//b': 'empty/dot segment', 'c/d/': None, './hidden': 'empty/dot segment',
        'nul\0byte': 'NUL', 'n' * 300: 'long', 'deep/' + 'n' * 256: 'long',
    }
    good = {'ok-' + 'n' * 252: b'255-byte name', 'ctl\x01\x1b[31m': b'escape sequence',
            'both': b'object and folder', 'both/child': b'child', 'trail/': b'marker content',
            'trail/inside': b'inside', 'x/z': b'sibling of bad keys', 'plain.bin': b'plain'}
    for key in bad:
        private_oss.put_object(BUCKET, 'data/' + key, b'bad key ' + key.encode('utf-8', 'replace'))
    for key, data in good.items():
        private_oss.put_object(BUCKET, 'data/' + key, data)
    mounted = mounter.mount(oss_source(private_oss))
    view = mounted_view(mounted.path)
    assert view == expected_view(list(bad) + list(good))
    assert view['both'] == 'dir' and view['trail'] == 'dir' and view['c/d'] == 'dir'
    assert 'ok-' + 'n' * 252 in view and 'etc' not in view and 'escape' not in view
    assert_nothing_escapes(mounted, view)
    for relpath, kind in view.items():
        if kind == 'file':
            assert (mounted.path / relpath).read_bytes() == good[relpath], relpath
    # each kind of skipped key is logged once, with a count
    lines = skipped_lines(mounted)
    assert len(lines) == len(set(kind for kind in bad.values() if kind)) + 1, lines
    assert any('both' in line and 'folder' in line for line in lines), lines
    # lookups of the skipped names find nothing, and the mount still answers
    for name in ('..', '.', 'nul', 'n' * 300):
        try:
            os.stat(mounted.path / 'x' / name)
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.ENAMETOOLONG), (name, exc)
    assert os.path.realpath(mounted.path / '..' / mounted.path.name) == str(mounted.path)
    assert pid_alive(mounted.pid)


def test_local_names_posix_allows_but_utf8_does_not_are_served(tmp_path, mounter):
    root = tmp_path / 'local-src'
    root.mkdir()
    files = {b'bad-\xff\xfe.bin': b'invalid utf-8', b'new\nline': b'newline',
             b'latin1-caf\xe9': b'latin-1', b'ok-' + b'n' * 252: b'255 bytes',
             b'dir-\x80/inner': b'in an invalid utf-8 folder'}
    for name, data in files.items():
        path = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
    source = Source('local', str(root), [], clean_env(), {}, root)
    mounted = mounter.mount(source)
    found = {}
    for folder, _, names in os.walk(os.fsencode(mounted.path)):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, os.fsencode(mounted.path))] = f.read()
    assert found == files
    # and again from the saved listing, after a remount
    mounter.umount(mounted)
    mounted = mounter.mount(source)
    with open(os.path.join(os.fsencode(mounted.path), b'bad-\xff\xfe.bin'), 'rb') as f:
        assert f.read() == b'invalid utf-8'


def test_symlink_loops_in_a_local_source_are_skipped_not_walked(tmp_path, mounter):
    """Two links back to a parent used to be walked 40 levels deep each: 2**40 paths."""
    root = tmp_path / 'local-src'
    (root / 'data').mkdir(parents=True)
    (root / 'data' / 'file.bin').write_bytes(b'data')
    os.symlink('..', root / 'data' / 'loop')
    os.symlink('.', root / 'data' / 'self')
    os.symlink('nowhere', root / 'dangling')
    os.symlink('data/file.bin', root / 'link.bin')       # a link to a file is that file
    source = Source('local', str(root), [], clean_env(), {}, root)
    mounted = mounter.mount(source)
    view = mounted_view(mounted.path)
    assert view == {'data': 'dir', 'data/file.bin': 'file', 'link.bin': 'file'}
    assert (mounted.path / 'link.bin').read_bytes() == b'data'
    assert_nothing_escapes(mounted, view)
    log = mounted.log_file.read_text()
    assert log.count('a link back to a folder that contains it') == 2


# -- who may see the mount and the cache --

def test_allow_other_is_off_unless_asked_for(local_source, mounter):
    def super_options(path):
        with open('/proc/self/mountinfo') as f:
            for line in f:
                left, _, right = line.partition(' - ')
                if left.split()[4] == str(path):
                    return right.split()[2].split(',')
        raise AssertionError(f'{path} is not mounted')
    plain = mounter.mount(local_source)
    assert 'allow_other' not in super_options(plain.path)
    opened = mounter.mount(local_source, '--allow-other', name='shared',
                           cache_dir=mounter.tmp_path / 'cache-shared')   # one daemon per folder
    assert 'allow_other' in super_options(opened.path)


def test_cache_is_owned_by_the_daemon_user_and_private_even_under_umask_0(local_source,
                                                                          tmp_path):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    cache = tmp_path / 'cache'
    command = [sys.executable, '-m', 'cachefs', 'mount', local_source.url, str(mountpoint),
               '--cache-dir', str(cache), '--block-size', '1M']
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True,
                            timeout=60, umask=0)
    assert result.returncode == 0, result.stderr
    try:
        big = max(local_source.manifest, key=lambda p: local_source.manifest[p][0])
        (mountpoint / big).read_bytes()
        pid = int(os.getxattr(mountpoint, 'user.cachefs.pid'))
        wait_for_disk_writes(Mounted(mountpoint, pid, cache, None))
        source_folder = next(cache.iterdir())
        checked = 0
        for folder, dirnames, filenames in os.walk(source_folder):
            for name in dirnames + [None]:
                path = folder if name is None else os.path.join(folder, name)
                st = os.stat(path)
                assert st.st_mode & 0o777 == 0o700, path
                assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path
            for name in filenames:
                st = os.stat(os.path.join(folder, name))
                assert st.st_mode & 0o777 == 0o600, name
                assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), name
                checked += 1
        assert checked > 1 and pid_alive(pid)
    finally:
        assert run_cachefs('umount', mountpoint).returncode == 0


# -- credentials --

SECRET_MARK = 'Sekr1t-'



@pytest.mark.expected_log(r'ERROR cachefs\.cli: access denied to s3://\S+: listing s3://\S+: '
                          r'SignatureDoesNotMatch ')
def test_secrets_never_reach_logs_stats_metrics_or_error_messages(seaweed, tmp_path, mounter):
    """A mount at debug level, reads that succeed and reads that fail, then every place a
    secret could leak to is searched for it (and for its first half, in case of truncation)."""
    secret = seaweed.secret_key
    token = SECRET_MARK + uuid.uuid4().hex        # a session token the server ignores
    prefix = f'secret-{uuid.uuid4().hex[:8]}'
    root = tmp_path / 'src'
    manifest = write_tree(root, small_dataset(seed=prefix))
    seaweed.create_bucket(BUCKET)
    client = seaweed.client()
    for relpath in manifest:
        client.upload_file(str(root / relpath), BUCKET, f'{prefix}/{relpath}')
    has_metrics = any(o.name == 'metrics-addr' for o in MOUNT_OPTIONS)
    metrics_args = ['--metrics-addr', f'127.0.0.1:{free_port()}'] if has_metrics else []
    with FaultProxy('127.0.0.1', seaweed.s3_port) as proxy:
        env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=secret,
                        AWS_DEFAULT_REGION='us-east-1')
        source = Source('s3', f's3://{BUCKET}/{prefix}', ['--endpoint-url', proxy.endpoint],
                        env, manifest, root)
        mounted = mounter.mount(source, '--retry-timeout', '1s', '--request-timeout', '1s',
                                *metrics_args)
        assert (mounted.path / 'shard-0.bin').read_bytes() == (root / 'shard-0.bin').read_bytes()
        proxy.plan = ByName({'shard-1': Always('http_500'), 'shard-2': Always('reset_mid_body')})
        with ThreadPoolExecutor(2) as pool:
            failed = list(pool.map(lambda name: call_within(30, (mounted.path / name).read_bytes),
                                   ('shard-1.bin', 'shard-2.bin')))
        assert all(isinstance(outcome.error, OSError) for outcome in failed)
        proxy.plan = None
        places = {'log': mounted.log_file.read_text(),
                  'stats xattr': os.getxattr(mounted.path, 'user.cachefs.stats').decode(),
                  'cachefs stats': run_cachefs('stats', mounted.path).stdout,
                  'cachefs stats --json': run_cachefs('stats', mounted.path, '--json').stdout,
                  'cmdline': Path(f'/proc/{mounted.pid}/cmdline').read_bytes().decode(
                      errors='replace')}
        if metrics_args:
            address = metrics_args[1]
            places['metrics'] = urllib.request.urlopen(f'http://{address}/metrics',
                                                       timeout=10).read().decode()
        mounter.umount(mounted)

        # rejected credentials, with a known wrong secret, fail with a message: no secret in it
        wrong = dict(env, AWS_SECRET_ACCESS_KEY=token)
        other = tmp_path / 'other'
        other.mkdir()
        rejected = run_cachefs('mount', source.url, other, *source.args, '--cache-dir',
                               tmp_path / 'cache2', '--log-file', tmp_path / 'rejected.log',
                               '--log-level', 'debug', env=wrong)
        assert rejected.returncode == errors.EXIT_ACCESS
        places['rejected stderr'] = rejected.stderr
        places['rejected log'] = (tmp_path / 'rejected.log').read_text()
    assert "'fuse_ops'" not in places['log']
    for where, text in places.items():
        for needle in (secret, secret[:len(secret) // 2], token, token[:len(token) // 2]):
            assert needle not in text, f'a secret leaked into the {where}'
    print(f'\nsearched for the secret in: {", ".join(places)}')


@pytest.mark.parametrize('url', ['s3://AKIAEXAMPLE:{secret}@cachefs-test/data',
                                 'oss://LTAIEXAMPLE:{secret}@bucket/prefix',
                                 's3://{secret}@bucket', 'file://me:{secret}@/data'])
def test_credentials_in_the_source_url_are_refused_without_echoing_them(url, tmp_path):
    secret = SECRET_MARK + uuid.uuid4().hex
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    result = run_cachefs('mount', url.format(secret=secret), mountpoint, '--cache-dir',
                         tmp_path / 'cache', '--log-file', tmp_path / 'log')
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert len(lines) == 1 and 'credentials' in lines[0] and 'environment' in lines[0], lines
    log = (tmp_path / 'log').read_text() if (tmp_path / 'log').exists() else ''
    assert secret not in result.stderr + result.stdout + log
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize('where', ['--endpoint-url', 'AWS_ENDPOINT_URL', 'CACHEFS_ENDPOINT_URL'])
def test_credentials_in_the_endpoint_url_are_refused_without_echoing_them(where, tmp_path):
    secret = SECRET_MARK + uuid.uuid4().hex
    endpoint = f'http://AKIAEXAMPLE:{secret}@127.0.0.1:9'
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    env = clean_env(AWS_ACCESS_KEY_ID='a', AWS_SECRET_ACCESS_KEY='b')
    args = []
    if where == '--endpoint-url':
        args = ['--endpoint-url', endpoint]
    else:
        env[where] = endpoint
    result = run_cachefs('mount', 's3://bucket/prefix', mountpoint, '--cache-dir',
                         tmp_path / 'cache', '--log-file', tmp_path / 'log', *args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert len(lines) == 1 and 'credentials' in lines[0], lines
    log = (tmp_path / 'log').read_text() if (tmp_path / 'log').exists() else ''
    assert secret not in result.stderr + result.stdout + log
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize('mode', [0o640, 0o600])
def test_a_credentials_file_others_can_read_is_warned_about_once(mode, seaweed, s3_source,
                                                                 tmp_path, mounter):
    credentials = tmp_path / 'aws-credentials'
    credentials.write_text(f'[default]\naws_access_key_id = {seaweed.access_key}\n'
                           f'aws_secret_access_key = {seaweed.secret_key}\n')
    os.chmod(credentials, mode)
    env = clean_env(AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_DEFAULT_REGION='us-east-1')
    mounted = mounter.mount(s3_source, env=env)          # the file's credentials work
    warnings = [line for line in mounted.log_file.read_text().splitlines()
                if ' WARNING ' in line and str(credentials) in line]
    if mode & 0o077:
        assert len(warnings) == 1, warnings
        assert f'{mode:04o}' in warnings[0] and 'chmod 600' in warnings[0]
    else:
        assert warnings == []
    assert seaweed.secret_key not in mounted.log_file.read_text()
