"""The daemon under a real cgroup memory limit: it sizes its defaulted options down (one log line)
and lives through a cold epoch of 64 readers and a refresh with every byte right, never
OOM-killed; explicit options that cannot fit are refused (exit 2, one line) before mounting.

Runs as root in a child memory cgroup of this process's own: cgroup v1 where the memory
controller is there (this machine is hybrid: v1 memory, a cgroup2 mount without it), else v2
when the unified hierarchy has the memory controller. The daemon is put in the cgroup by a
wrapper that writes its own pid to cgroup.procs before exec'ing `cachefs mount` (the daemon
process it starts inherits the cgroup).
"""

import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cachefs.demo.seaweed import upload_tree
from cachefs.memory_budget import HEADROOM
from conftest import (BLOCK_SIZE, clean_env, is_mounted, pid_alive, run_cachefs, sha256_of,
                      wait_until, write_tree)

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BUCKET = 'cachefs-memory-limit'
LIMIT = 512 * MiB
READERS = 64
SIZING_LINE = 'sized down --memory-cache-size'


def own_cgroup_folder(version):
    """This process's cgroup folder of the memory controller, or None."""
    controller = 'memory' if version == 'v1' else ''
    with open('/proc/self/cgroup') as f:
        for line in f:
            number, controllers, path = line.rstrip('\n').split(':', 2)
            if (version == 'v1' and controller in controllers.split(',')) or \
                    (version == 'v2' and number == '0'):
                break
        else:
            return None
    with open('/proc/self/mountinfo') as f:
        for line in f:
            fields, _, tail = line.partition(' - ')
            fields, tail = fields.split(), tail.split()
            if version == 'v1' and tail[0] == 'cgroup' and 'memory' in tail[2].split(','):
                break
            if version == 'v2' and tail[0] == 'cgroup2':
                break
        else:
            return None
    root, mountpoint = fields[3], fields[4]
    if not (path + '/').startswith(root.rstrip('/') + '/'):
        return None
    folder = Path(mountpoint) / path[len(root.rstrip('/')):].lstrip('/')
    if version == 'v2' and 'memory' not in (folder / 'cgroup.controllers').read_text().split():
        return None
    return folder


class Cgroup:
    """A child memory cgroup with a limit, removed (leftover pids moved to the parent) at exit."""

    def __init__(self, parent, version, limit):
        self.version = version
        self.parent = parent
        self.path = parent / f'cachefs-test-{uuid.uuid4().hex[:8]}'
        self.path.mkdir()
        limit_file = 'memory.limit_in_bytes' if version == 'v1' else 'memory.max'
        (self.path / limit_file).write_text(str(limit))

    def read(self, name):
        return (self.path / name).read_text()

    def oom_kills(self):
        text = self.read('memory.oom_control' if self.version == 'v1' else 'memory.events')
        return int(dict(line.split() for line in text.splitlines()).get('oom_kill', 0))

    def peak(self):
        name = 'memory.max_usage_in_bytes' if self.version == 'v1' else 'memory.peak'
        try:
            return int(self.read(name))
        except (OSError, ValueError):
            return None

    def wrap(self, argv):
        """argv run inside this cgroup."""
        procs = shlex.quote(str(self.path / 'cgroup.procs'))
        return ['sh', '-c', f'echo $$ > {procs} && exec "$@"', 'sh', *map(str, argv)]

    def remove(self):
        deadline = time.monotonic() + 10
        while True:
            for pid in self.read('cgroup.procs').split():
                try:
                    (self.parent / 'cgroup.procs').write_text(pid)
                except OSError:
                    pass        # it exited meanwhile
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.fixture
def memory_cgroup():
    if os.geteuid() != 0:
        pytest.skip('creating a memory cgroup needs root')
    for version in ('v1', 'v2'):
        parent = own_cgroup_folder(version)
        if parent is not None and os.access(parent, os.W_OK):
            break
    else:
        pytest.skip('no writable memory cgroup (neither a v1 memory hierarchy nor a v2 one with '
                    'the memory controller)')
    try:
        cgroup = Cgroup(parent, version, LIMIT)
    except OSError as exc:
        pytest.skip(f'cannot create a memory cgroup under {parent}: {exc}')
    try:
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def dataset(seaweed, tmp_path):
    """64 files of 4-8 MiB (384 MiB in all: more than the limit) under a prefix of its own."""
    prefix = f'mem-{uuid.uuid4().hex[:8]}'
    rng = random.Random(prefix)
    files = {f'part-{i // 16}/file-{i:02d}.bin': rng.randbytes(rng.randrange(4 * MiB, 8 * MiB))
             for i in range(READERS)}
    root = tmp_path / 'src'
    manifest = write_tree(root, files)
    seaweed.create_bucket(BUCKET)
    upload_tree(seaweed.client(), BUCKET, prefix + '/', root)
    env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key,
                    AWS_SECRET_ACCESS_KEY=seaweed.secret_key, AWS_DEFAULT_REGION='us-east-1')
    return f's3://{BUCKET}/{prefix}', ['--endpoint-url', seaweed.endpoint], env, manifest


def mount_in(cgroup, dataset, tmp_path, *options, log_file=True):
    url, args, env, _ = dataset
    mountpoint = tmp_path / 'mnt'
    mountpoint.mkdir(exist_ok=True)
    argv = [sys.executable, '-m', 'cachefs', 'mount', url, mountpoint, *args,
            '--cache-dir', tmp_path / 'cache', '--block-size', BLOCK_SIZE, *options]
    if log_file:
        argv += ['--log-file', tmp_path / 'daemon.log']
    return mountpoint, subprocess.run(cgroup.wrap(argv), env=env, capture_output=True, text=True,
                                      timeout=120)


def vm_hwm(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


@pytest.fixture
def unmount_at_end(request):
    """Unmounts what the test mounted, before the daemon logs are checked and the cgroup goes."""
    mounted = []

    def stop():
        for mountpoint, pid in mounted:
            if is_mounted(mountpoint):
                run_cachefs('umount', mountpoint, '--timeout', '15')
            if is_mounted(mountpoint):
                subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False)
            if not wait_until(lambda: not pid_alive(pid), timeout=10):
                os.kill(pid, 9)
                wait_until(lambda: not pid_alive(pid), timeout=10)
    request.config.pluginmanager.get_plugin('support.checklogs').stop_before_check(
        request.node, stop)
    try:
        yield mounted
    finally:
        stop()


@pytest.mark.timeout(600)
def test_daemon_in_a_memory_limited_cgroup_sizes_itself_down_and_survives_64_cold_readers_and_a_refresh(  # noqa: E501
        memory_cgroup, dataset, tmp_path, unmount_at_end):
    manifest = dataset[3]
    mountpoint, result = mount_in(memory_cgroup, dataset, tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int(os.getxattr(mountpoint, 'user.cachefs.pid'))
    unmount_at_end.append((mountpoint, pid))
    assert str(pid) in memory_cgroup.read('cgroup.procs').split()
    log_text = (tmp_path / 'daemon.log').read_text()
    sizing = [line for line in log_text.splitlines() if SIZING_LINE in line]
    assert len(sizing) == 1, log_text
    assert f'{memory_cgroup.path}/' in sizing[0]
    stats = json.loads(os.getxattr(mountpoint, 'user.cachefs.stats'))
    budget = stats['memory_budget_bytes']
    assert budget <= LIMIT * HEADROOM
    assert stats['memory_capacity_bytes'] < 1 << 30

    # a cold epoch: 64 readers, one file each, read whole in 1 MiB reads and checked
    problems = []

    def reader(relpath):
        try:
            found = sha256_of(mountpoint / relpath)
            if found != manifest[relpath][1]:
                problems.append(f'{relpath}: wrong bytes')
        except OSError as exc:
            problems.append(f'{relpath}: {exc!r}')
    threads = [threading.Thread(target=reader, args=(relpath,)) for relpath in sorted(manifest)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert problems == []

    refreshed = run_cachefs('refresh', mountpoint, env=dataset[2])
    assert refreshed.returncode == 0, refreshed.stderr
    relpath = sorted(manifest)[0]
    assert sha256_of(mountpoint / relpath) == manifest[relpath][1]

    stats = json.loads(os.getxattr(mountpoint, 'user.cachefs.stats'))      # still answers
    peak_rss = vm_hwm(pid)
    figures = {
        'limit_mib': LIMIT / MiB, 'formula_mib': round(stats['memory_budget_bytes'] / MiB, 1),
        'peak_rss_mib': round(peak_rss / MiB, 1),
        'cgroup_peak_mib': round((memory_cgroup.peak() or 0) / MiB, 1),
        'cgroup_failcnt': memory_cgroup.read('memory.failcnt').strip()
        if memory_cgroup.version == 'v1' else None,
        'oom_kills': memory_cgroup.oom_kills(), 'sizing': sizing[0].split(': ', 1)[-1],
        'store_bytes': stats['store_bytes'],
    }
    print(f'\nmemory limit figures: {json.dumps(figures)}')
    assert pid_alive(pid)
    assert memory_cgroup.oom_kills() == 0
    assert peak_rss <= stats['memory_budget_bytes'], figures


@pytest.mark.timeout(300)
def test_explicit_options_that_cannot_fit_the_limit_are_refused_with_one_line_and_exit_2(
        memory_cgroup, tmp_path):
    write_tree(tmp_path / 'src', {'a.bin': b'a'})
    local = (str(tmp_path / 'src'), [], clean_env(), {})
    # a background mount: the parent prints the one line its daemon reported
    mountpoint, result = mount_in(memory_cgroup, local, tmp_path, '--memory-cache-size', '1G',
                                  log_file=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f'cachefs: error: memory limit 512.0 MiB (cgroup '
                               f'{memory_cgroup.version} {memory_cgroup.path}/')
    assert 'the options given (--memory-cache-size, --block-size) need' in lines[0]
    assert not is_mounted(mountpoint)
