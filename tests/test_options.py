"""Every mount option has a documented range, checked when the command line is parsed: a bad
value is one line and exit 2 before anything starts, whether it comes from a flag, -o, a
CACHEFS_* variable or the config file, in the foreground or the background.

The table below holds good and bad values for every option of MOUNT_OPTIONS (a test fails when
an option has no row). Every value goes through the real CLI entry point, `cachefs.cli.main`,
in-process, with the two places where a mount would start (`run_daemon`, `spawn_daemon`)
replaced by a recorder: parsing a few thousand values then takes a second. Real processes then
check that the values reach the daemon intact: each column of good values, foreground and
background, runs `cachefs mount` against a mount point that does not exist (so it ends at that
check, exit 6, nothing mounted), the bad values of the issue run as real processes too, and two
real mounts use every option at the low and at the high end of its range.
"""

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachefs import cli, errors
from cachefs.config import MOUNT_OPTIONS, converter
from conftest import assert_tree_matches, clean_env, is_mounted, run_cachefs

README = (os.path.join(os.path.dirname(__file__), '..', 'README.md'))

FLAG = (['true', 'false'], ['maybe', '2'])

# option: ([good values], [bad values]); '{tmp}' and '{config}' are filled in per test.
TABLE = {
    'cache-dir': (['{tmp}/cache', '{tmp}/-dash'], ['']),
    'endpoint-url': (['http://127.0.0.1:9', 'https://s3.example.com:8443/'],
                     ['ftp://127.0.0.1', 'http://', 'http://127.0.0.1:99999', 's3://bucket',
                      'file:///tmp']),
    'region': (['us-east-1', '-x'], ['', 'us east 1']),
    'path-style': FLAG,
    'no-sign-request': FLAG,
    'block-size': (['64K', '1M', '64M', '65536'],
                   ['0', '0.5', '1', '4095', '96K', '3M', '128M', '1G', '-1M', 'lots']),
    'memory-cache-size': (['0', '64M', '1G'], ['-1', 'lots', '1P']),
    'cache-size': (['0', '100G', '0%', '50%', '100%'], ['-5%', '150%', '-1', 'lots', 'x%']),
    'free-space-ratio': (['0', '0.5', '10%', '99%'], ['-0.1', '1', '100%', 'half', 'nan', 'nan%']),
    'eviction': (['lru', 'none', 'auto'], ['sometimes', '']),
    'prefetch-window': (['0', '4M', '1G'], ['-1', '2G']),
    'prefetch-memory': (['0', '512M'], ['-1', '1P']),
    'metadata-ttl': (['0', '30s', 'inf'], ['soon', '-5s']),
    'entry-timeout': (['0', '2h', '365d'], ['inf', '366d', 'soon']),
    'attr-timeout': (['0', '2h', '365d'], ['inf', '366d', 'soon']),
    'max-idle-threads': (['1', '128', '10000'], ['0', '-1', '10001', '1.5']),
    'store-concurrency': (['1', '32', '1024'], ['0', '-1', '1025', 'many']),
    'request-timeout': (['1ms', '30s', '1h'], ['0', '-1', '2h', 'inf']),
    'retry-timeout': (['1ms', '60s', '1d'], ['0', '0s', '2d', 'inf']),
    'read-ahead': (['0', '4M', '1G'], ['-1', '2G']),
    'max-background': (['1', '64', '65535'], ['0', '-1', '65536']),
    'allow-other': FLAG,
    'uid': (['0', '1000', '4294967294'], ['-1', '4294967295', '99999999999', 'root']),
    'gid': (['0', '1000', '4294967294'], ['-1', '4294967295', '99999999999', 'root']),
    'log-file': (['{tmp}/cachefs.log'], ['', '{tmp}/no-such-folder/cachefs.log']),
    'log-level': (['debug', 'error'], ['verbose']),
    'metrics-addr': (['127.0.0.1:9100', ':9100', '[::1]:9100'],
                     ['9100', '127.0.0.1:0', '127.0.0.1:65536', 'localhost']),
    'cluster': (['memcached://127.0.0.1:11211', 'memcached://10.0.0.1,10.0.0.2:11212',
                 'memcached://[::1]:11211'],
                ['', 'redis://h:6379', 'memcached://', 'memcached://h:0', 'memcached://h:99999',
                 'memcached://u@h', 'memcached://h/path', 'memcached://h k', 'h:11211']),
    'cluster-timeout': (['1ms', '200ms', '60s'], ['0', '-1', '61s', 'inf', 'soon']),
    'cluster-connect-timeout': (['1ms', '50ms', '10s'], ['0', '11s', 'inf']),
    'cluster-secret-file': (['{tmp}/secret'], ['']),
    'cluster-refresh': (['1s', '30s', '1d'], ['0', '0.5s', '2d', 'inf']),
    'cluster-fill-queue': (['0', '16', '4096'], ['-1', '4097', 'many']),
    'profile': (['training'], ['nope']),
    'config': (['{config}'], ['{tmp}/missing.toml']),
}

OPTIONS = {option.name: option for option in MOUNT_OPTIONS}
MODES = ('flag', 'dash_o', 'env', 'config_file')


def env_name(name):
    return 'CACHEFS_' + name.replace('-', '_').upper()


def cases(which):
    return list(_cases(which))


def _cases(which):
    for name, values in TABLE.items():
        for value in values[which]:
            for mode in MODES:
                if mode == 'config_file' and name == 'config':
                    continue            # a config file cannot name a config file
                yield pytest.param(name, value, mode, id=f'{name}={value}-{mode}')


class Started(Exception):
    """Raised by the recorder in place of a mount starting."""


@pytest.fixture
def cli_main(tmp_path, monkeypatch, capsys):
    """main(name, value, mode, foreground) -> (exit code, stderr lines, options that would have
    started a mount or None)."""
    for variable in list(os.environ):
        if variable.startswith(('CACHEFS_', 'AWS_', 'OSS_')):
            monkeypatch.delenv(variable)
    config = tmp_path / 'good.toml'
    config.write_text('[mount]\nmemory_cache_size = "64M"\n')
    source = tmp_path / 'source'
    source.mkdir(exist_ok=True)
    started = []

    def record(options):
        started.append(options)
        return 0
    monkeypatch.setattr(cli, 'run_daemon', record)
    monkeypatch.setattr(cli, 'spawn_daemon', record)

    def run(name, value, mode, foreground):
        value = value.format(tmp=tmp_path, config=config)
        option = OPTIONS[name]
        args, environ = [], {'CACHEFS_CONFIG': os.devnull}
        if mode == 'flag':
            if option.kind != 'flag':
                args = [f'--{name}={value}']
            elif value not in ('true', 'false'):
                args = [f'--{name}={value}']           # argparse refuses a value for a flag
            elif value == 'true':
                args = [f'--{name}']
        elif mode == 'dash_o':
            args = ['-o', f'{name.replace("-", "_")}={value}']
        elif mode == 'env':
            environ[env_name(name)] = value
        else:
            path = tmp_path / 'options.toml'
            quoted = value.replace('\\', '\\\\').replace('"', '\\"')
            path.write_text(f'[mount]\n{name.replace("-", "_")} = "{quoted}"\n')
            environ['CACHEFS_CONFIG'] = str(path)
        for variable, text in environ.items():
            monkeypatch.setenv(variable, text)
        started.clear()
        code = cli.main(['mount', str(source), str(tmp_path / 'no-mnt'), *args]
                        + (['--foreground'] if foreground else []))
        for variable in environ:
            monkeypatch.delenv(variable)
        err = capsys.readouterr().err
        return code, err.strip().splitlines(), (started[0] if started else None)
    return run


def test_every_mount_option_has_a_row_in_the_table():
    assert sorted(TABLE) == sorted(OPTIONS)


def test_the_readme_states_the_range_of_every_option():
    rows = {line.split('|')[1].strip(): line for line in open(README).read().splitlines()
            if line.startswith('| `--')}
    missing = [name for name, option in OPTIONS.items()
               if option.limits and option.limits not in rows.get(f'`--{name}`', '')]
    assert missing == []


@pytest.mark.parametrize('foreground', [True, False], ids=['foreground', 'background'])
@pytest.mark.parametrize('name, value, mode', cases(1))
def test_a_bad_value_is_one_line_and_exit_2_before_anything_starts(cli_main, name, value, mode,
                                                                   foreground):
    code, lines, started = cli_main(name, value, mode, foreground)
    assert started is None, 'a mount started'
    assert code == errors.EXIT_USAGE, lines
    assert len(lines) == 1 and lines[0].startswith('cachefs: error: '), lines
    assert name in lines[0] or name.replace('-', '_') in lines[0] or env_name(name) in lines[0] \
        or 'profile' in lines[0] or 'config file' in lines[0], lines[0]


@pytest.mark.parametrize('foreground', [True, False], ids=['foreground', 'background'])
@pytest.mark.parametrize('name, value, mode', cases(0))
def test_a_good_value_reaches_the_daemon_converted(cli_main, name, value, mode, foreground,
                                                   tmp_path):
    code, lines, started = cli_main(name, value, mode, foreground)
    assert code == 0 and lines == [] and started is not None, lines
    option = OPTIONS[name]
    got = getattr(started, name.replace('-', '_'))
    if option.kind == 'flag':
        assert got is (value == 'true')
    elif option.kind != 'choice':
        assert got == converter(option)(value.format(tmp=tmp_path, config=tmp_path / 'good.toml'))
    else:
        assert got == value


# -- real processes --

def column(index, tmp_path):
    """Command line arguments that give every option its `index`-th good value (or its last)."""
    config = tmp_path / 'good.toml'
    config.write_text('[mount]\nmemory_cache_size = "64M"\n')
    args = []
    for name, (good, _) in TABLE.items():
        value = good[min(index, len(good) - 1)].format(tmp=tmp_path, config=config)
        if OPTIONS[name].kind == 'flag':
            args += [f'--{name}'] if value == 'true' else []
        else:
            args.append(f'--{name}={value}')
    return args


@pytest.mark.parametrize('index', range(max(len(good) for good, _ in TABLE.values())))
@pytest.mark.expected_log(r'ERROR cachefs\.cli: mount point \S+/no-such-mountpoint does not exist')
def test_good_values_reach_the_daemon_process_in_the_foreground_and_the_background(
        tmp_path, index):
    missing = tmp_path / 'no-such-mountpoint'
    args = ['mount', tmp_path, missing, *column(index, tmp_path)]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda extra: run_cachefs(*args, *extra, timeout=60),
                             [['--foreground'], []]))
    for result in runs:
        # the daemon parsed every value again and stopped at the first check of the mount
        assert result.returncode == errors.EXIT_MOUNTPOINT, result.stderr
        assert f'mount point {missing} does not exist' in result.stderr
        assert 'Traceback' not in result.stderr
    assert not missing.exists()


ISSUE_VALUES = [('--block-size', '0'), ('--block-size', '0.5'), ('--block-size', '1'),
                ('--block-size', '4G'), ('--store-concurrency', '0'),
                ('--store-concurrency', '-1'), ('--request-timeout', '0'), ('--uid', '-1'),
                ('--uid', '99999999999'), ('--cache-size', '-5%'), ('-o', 'cache_size=150%')]


def test_the_bad_values_of_the_issue_fail_at_once_as_real_processes(tmp_path):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    jobs = [(flag, value, mode) for flag, value in ISSUE_VALUES
            for mode in (['--foreground'], [])]

    def run(job):
        flag, value, mode = job
        pair = [flag, value] if flag == '-o' else [f'{flag}={value}']
        return job, run_cachefs('mount', tmp_path, mountpoint, '--cache-dir', tmp_path / 'cache',
                                *pair, *mode, timeout=60)
    try:
        with ThreadPoolExecutor(4) as pool:
            for job, result in pool.map(run, jobs):
                lines = result.stderr.strip().splitlines()
                assert result.returncode == errors.EXIT_USAGE, (job, result.stderr)
                assert len(lines) == 1 and 'out of range' in lines[0], (job, lines)
        assert not is_mounted(mountpoint) and not (tmp_path / 'cache').exists()
    finally:
        for _ in jobs:                      # what values that were let through mounted
            if is_mounted(mountpoint):
                subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)


LOW_END = ['--block-size=64K', '--memory-cache-size=0', '--cache-size=0',
           '--free-space-ratio=0', '--prefetch-window=0', '--prefetch-memory=0',
           '--metadata-ttl=0', '--entry-timeout=0', '--attr-timeout=0', '--max-idle-threads=1',
           '--store-concurrency=1', '--request-timeout=1ms', '--retry-timeout=1ms',
           '--read-ahead=0', '--max-background=1', '--uid=0', '--gid=0', '--region=-x']
HIGH_END = ['--block-size=64M', '--memory-cache-size=256M', '--cache-size=100%',
            '--free-space-ratio=0', '--prefetch-window=1G', '--prefetch-memory=256M',
            '--metadata-ttl=inf', '--entry-timeout=365d', '--attr-timeout=365d',
            '--max-idle-threads=10000', '--store-concurrency=1024', '--request-timeout=1h',
            '--retry-timeout=1d', '--read-ahead=1G', '--max-background=65535',
            '--uid=4294967294', '--gid=4294967294', '--allow-other']


@pytest.mark.fuse
@pytest.mark.parametrize('args', [LOW_END, HIGH_END], ids=['low end', 'high end'])
def test_a_mount_with_every_option_at_an_end_of_its_range_serves_the_right_bytes(
        local_source, mounter, args):
    mounted = mounter.mount(local_source, *args, '--cache-dir=' + str(mounter.tmp_path / '-c'))
    assert_tree_matches(mounted.path, local_source.manifest)
    uid = next(arg for arg in args if arg.startswith('--uid=')).split('=')[1]
    assert os.stat(mounted.path).st_uid == int(uid)
    mounter.umount(mounted)
    assert not is_mounted(mounted.path)


# -- item 17: values and paths starting with '-' in the background --

@pytest.mark.fuse
def test_a_background_mount_takes_values_and_paths_that_start_with_a_dash(local_source, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    mountpoint = tmp_path / '-mnt'
    mountpoint.mkdir()
    try:
        result = run_cachefs('mount', '--cache-dir=-cache', '--region=-x', '-o', 'log_file=-log',
                             '--', local_source.url, '-mnt')
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint) and (tmp_path / '-cache').is_dir()
        assert (tmp_path / '-log').exists()
        assert_tree_matches(mountpoint, local_source.manifest)
    finally:
        run_cachefs('umount', mountpoint)
    assert not is_mounted(mountpoint)


# -- item 18: a log file that cannot be opened, an endpoint of another scheme --

@pytest.mark.parametrize('mode', [['--foreground'], []], ids=['foreground', 'background'])
def test_a_log_file_in_a_missing_folder_is_one_line_and_exit_2(tmp_path, mode):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    log_file = tmp_path / 'no-such-folder' / 'cachefs.log'
    result = run_cachefs('mount', tmp_path, mountpoint, '--cache-dir', tmp_path / 'cache',
                         '--log-file', log_file, *mode, timeout=60)
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert result.stderr == f'cachefs: error: --log-file {log_file}: No such file or directory\n'
    assert not is_mounted(mountpoint) and not (tmp_path / 'cache').exists()


@pytest.mark.parametrize('mode', [['--foreground'], []], ids=['foreground', 'background'])
@pytest.mark.parametrize('where', ['--endpoint-url', 'AWS_ENDPOINT_URL', 'CACHEFS_ENDPOINT_URL'])
def test_an_endpoint_of_another_scheme_than_http_is_refused_at_once(tmp_path, mode, where):
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir()
    endpoint = 'ftp://127.0.0.1:21'
    env = clean_env(AWS_ACCESS_KEY_ID='a', AWS_SECRET_ACCESS_KEY='b')
    args = ['--endpoint-url', endpoint] if where == '--endpoint-url' else []
    if not args:
        env[where] = endpoint
    started = time.monotonic()
    result = run_cachefs('mount', 's3://bucket/prefix', mountpoint, '--cache-dir',
                         tmp_path / 'cache', *args, *mode, env=env, timeout=60)
    assert time.monotonic() - started < 20          # not retried for --retry-timeout (60 s)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert len(lines) == 1 and "unsupported scheme 'ftp'" in lines[0], lines
    assert not is_mounted(mountpoint)


def test_an_s3_endpoint_needs_a_scheme_while_an_oss_one_may_be_a_bare_host(tmp_path):
    from cachefs.ufs import endpoint_problem
    assert endpoint_problem('oss-cn-hangzhou.aliyuncs.com', 'oss') is None
    assert endpoint_problem('http://127.0.0.1:8333', 's3') is None
    assert 'http://' in endpoint_problem('s3.example.com', 's3')
