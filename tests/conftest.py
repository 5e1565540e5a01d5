"""Fixtures: real object-store servers on loopback, datasets, and real FUSE mounts.

Every server and mount started here is stopped in teardown, by PID, even when a test fails.
SeaweedFS serves the S3 protocol; `support.oss_server` the OSS protocol (no ready-made server
accepts oss2's signatures); the local source needs no server. S3 traffic goes through
`support.proxy.CountingProxy` so that tests count store requests on the wire.
"""

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cachefs.cli import process_alive  # noqa: E402
from cachefs.demo.dataset import file_sha256, make_edge_case_tree, tree_manifest  # noqa: E402
from cachefs.demo import pagecache  # noqa: E402
from cachefs.demo.seaweed import SeaweedServer, upload_tree  # noqa: E402
from support.oss_server import OssServer  # noqa: E402
from support.proxy import CountingProxy  # noqa: E402

# support.checklogs: a test fails on an error or a traceback a daemon logged that it did not declare
# (pytester runs the tests of that check)
pytest_plugins = ['support.checklogs', 'pytester']

BLOCK_SIZE = 1 << 20          # small blocks in tests, so that small files span many of them
S3_BUCKET = 'cachefs-test'
OSS_BUCKET = 'cachefs-oss-test'
OSS_KEY_ID, OSS_SECRET = 'oss-test-key', 'oss-test-secret-Zq81'


def fuse_available():
    return os.path.exists('/dev/fuse') and os.access('/dev/fuse', os.R_OK | os.W_OK)


# The tier of every test module (README, "Development"): `pytest -m t0` runs one tier alone.
# A test is in its module's tier, raised to t1 when it uses a store server fixture and to t2 when
# it mounts (the `fuse` marker or a fixture that mounts): the tier says what a test needs.
TIERS = {
    't0': ('bench_objects', 'bench_plots', 'block_buffers', 'block_cache', 'cluster_protocol',
           'compact_tree', 'config', 'configfile', 'control', 'disk_format', 'docs',
           'failure_modes_doc', 'import_shape', 'listing_format', 'listing_integrity',
           'log_check', 'log_escaping', 'memory_budget', 'metrics', 'namespace', 'operations',
           'options', 'retired_nodes', 's3_sign', 'tiers'),
    't1': ('cluster_tier', 'etag_checks', 'http_hostile', 'local_source_hardening', 'oss_lean',
           'oss_server', 'parallel_listing', 's3_get', 's3_read_paths', 's3_trio'),
    't2': ('block_recycling', 'cache', 'cache_folder', 'credential_refresh', 'dashboard',
           'errors', 'mount', 'security', 'warmup'),
    't3': ('cluster', 'cluster_rig', 'faults', 'memory_limit', 'reliability', 'shutdown',
           'store_slots', 'stuck_disk'),
    't4': ('alert_rules', 'demo_support', 'deploy', 'examples'),
}
TIER_NEEDS = {
    't0': 'pure logic: no server, no mount',
    't1': 'stores: SeaweedFS, the OSS test server, scripted HTTP servers; no mount',
    't2': 'real FUSE mounts (/dev/fuse)',
    't3': 'faults and reliability: fault proxy, stuck disks, killed daemons, long runs',
    't4': 'deployment and tools: manifests, systemd unit, demo, examples, bench support',
}
SERVER_FIXTURES = {'seaweed', 's3_proxy', 's3_source', 's3_env', 'mutable_s3_source',
                   'oss_server', 'oss_source', 'private_oss_source', 'source', 'remote_source'}
MOUNT_FIXTURES = {'mounter', 'forged_mount'}      # forged_mount: test_control's own FUSE mount
MODULE_TIER = {f'test_{name}.py': tier for tier, names in TIERS.items() for name in names}


def tier_of(item):
    """The tier of a collected test, or None when its module has no row in TIERS."""
    tier = MODULE_TIER.get(item.path.name)
    if tier is None:
        return None
    names = set(getattr(item, 'fixturenames', ()))
    if tier < 't1' and names & SERVER_FIXTURES:
        tier = 't1'
    if tier < 't2' and ('fuse' in item.keywords or names & MOUNT_FIXTURES):
        tier = 't2'
    return tier


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if tier:
            item.add_marker(tier)
    if fuse_available():
        return
    skip = pytest.mark.skip(reason='/dev/fuse is absent or not accessible')
    for item in items:
        if 'fuse' in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line('markers', 'fuse: needs /dev/fuse and mounts a real file system')
    for tier, needs in TIER_NEEDS.items():
        config.addinivalue_line('markers', f'{tier}: test tier {tier}, {needs}')


def clean_env(**extra):
    """The environment of a cachefs process: no AWS/OSS settings of the developer's leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('AWS_', 'OSS_', 'CACHEFS_', 'NOTIFY_SOCKET'))}
    env['AWS_CONFIG_FILE'] = env['AWS_SHARED_CREDENTIALS_FILE'] = '/dev/null'
    env['AWS_EC2_METADATA_DISABLED'] = 'true'
    env['CACHEFS_CONFIG'] = '/dev/null'     # a config file of the machine must not leak in
    env.update(extra)
    return env


def run_cachefs(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, '-m', 'cachefs', *map(str, args)],
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


sha256_of = file_sha256


@dataclass
class Source:
    """A store holding the edge-case tree, and how to mount it."""
    name: str
    url: str
    args: list
    env: dict
    manifest: dict                       # relpath -> (size, sha256)
    local_root: Path
    request_count: object = None         # () -> requests the store has seen (None for local)
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope='session')
def edge_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp('edge-tree')
    make_edge_case_tree(root, seed=7, block_size=BLOCK_SIZE)
    return root, tree_manifest(root)


@pytest.fixture(scope='session')
def seaweed(tmp_path_factory):
    folder = tmp_path_factory.mktemp('seaweedfs')
    server = SeaweedServer(folder / 'data', log_path=folder / 'weed.log')
    server.start()
    try:
        yield server
    finally:
        # weed's graceful stop waits out a fixed 15 s timeout; its data is not needed afterwards
        server.stop(timeout=2)


@pytest.fixture(scope='session')
def s3_proxy(seaweed):
    with CountingProxy('127.0.0.1', seaweed.s3_port) as proxy:
        yield proxy


@pytest.fixture(scope='session')
def s3_source(seaweed, s3_proxy, edge_tree):
    root, manifest = edge_tree
    client = seaweed.client()
    seaweed.create_bucket(S3_BUCKET)
    upload_tree(client, S3_BUCKET, 'data/', root)
    env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                    AWS_DEFAULT_REGION='us-east-1')
    return Source('s3', f's3://{S3_BUCKET}/data', ['--endpoint-url', s3_proxy.endpoint],
                  env, manifest, root, s3_proxy.count)


@pytest.fixture
def s3_env(s3_source, monkeypatch):
    """The S3 source, with its credentials in this process's environment (for tests that open
    an `S3Store` in-process rather than mount)."""
    for name, value in s3_source.env.items():
        monkeypatch.setenv(name, value)
    return s3_source


@pytest.fixture(scope='session')
def oss_server(tmp_path_factory):
    server = OssServer(str(tmp_path_factory.mktemp('oss')), {OSS_KEY_ID: OSS_SECRET})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope='session')
def oss_source(oss_server, edge_tree):
    root, manifest = edge_tree
    oss_server.create_bucket(OSS_BUCKET)
    for relpath in manifest:
        oss_server.put_object(OSS_BUCKET, 'data/' + relpath, (root / relpath).read_bytes())
    env = clean_env(OSS_ACCESS_KEY_ID=OSS_KEY_ID, OSS_ACCESS_KEY_SECRET=OSS_SECRET)
    return Source('oss', f'oss://{OSS_BUCKET}/data', ['--endpoint-url', oss_server.endpoint],
                  env, manifest, root, oss_server.request_count)


@pytest.fixture(scope='session')
def local_source(edge_tree):
    root, manifest = edge_tree
    return Source('local', str(root), [], clean_env(), manifest, root)


@pytest.fixture(params=['local', 's3', 'oss'])
def source(request):
    return request.getfixturevalue(f'{request.param}_source')


@pytest.fixture(params=['s3', 'oss'])
def remote_source(request):
    """A source behind a server that counts the requests it receives."""
    return request.getfixturevalue(f'{request.param}_source')


@dataclass
class Mounted:
    path: Path
    pid: int
    cache_dir: Path
    log_file: Path

    def stats(self):
        return json.loads(os.getxattr(self.path, 'user.cachefs.stats'))


pid_alive = process_alive


def is_mounted(path):
    path = os.path.abspath(path)
    with open('/proc/self/mountinfo') as f:
        return any(line.split()[4] == path for line in f)


class Mounter:
    """Mounts through the real CLI and undoes everything in `cleanup`."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.mounted = []
        self.cache_dir = tmp_path / 'cache'

    def mountpoint(self, name='mnt'):
        path = self.tmp_path / name
        path.mkdir(exist_ok=True)
        return path

    def mount(self, source, *args, name='mnt', cache_dir=None, env=None):
        path = self.mountpoint(name)
        cache_dir = cache_dir or self.cache_dir
        log_file = self.tmp_path / f'{name}.log'
        result = run_cachefs('mount', source.url, path, *source.args, '--cache-dir', cache_dir,
                             '--block-size', BLOCK_SIZE, '--log-file', log_file, '--log-level',
                             'debug', *args, env=env or source.env)
        assert result.returncode == 0, (result.stderr, log_file.read_text()
                                        if log_file.exists() else '')
        pid = int(os.getxattr(path, 'user.cachefs.pid'))
        mounted = Mounted(path, pid, Path(cache_dir), log_file)
        self.mounted.append(mounted)
        return mounted

    def umount(self, mounted):
        result = run_cachefs('umount', mounted.path)
        assert result.returncode == 0, result.stderr
        return result

    def cleanup(self):
        for mounted in self.mounted:
            if is_mounted(mounted.path):
                run_cachefs('umount', mounted.path, '--timeout', '15')
            if is_mounted(mounted.path):
                subprocess.run(['fusermount3', '-u', '-z', str(mounted.path)], check=False)
            deadline = time.monotonic() + 10
            while pid_alive(mounted.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(mounted.pid):
                os.kill(mounted.pid, 9)


@pytest.fixture
def mounter(tmp_path, request):
    mounter = Mounter(tmp_path)
    # unmounted before the daemon logs are checked, so that what a daemon logs on its way out
    # counts for the test
    request.config.pluginmanager.get_plugin('support.checklogs').stop_before_check(
        request.node, mounter.cleanup)
    try:
        yield mounter
    finally:
        mounter.cleanup()


def write_tree(root, files):
    """files: {relpath: bytes}. Returns the manifest {relpath: (size, sha256)}."""
    manifest = {}
    for relpath, data in files.items():
        path = Path(root) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest[relpath] = (len(data), hashlib.sha256(data).hexdigest())
    return manifest


def small_dataset(seed):
    """A few files spanning several test blocks, with a partial last block."""
    rng = random.Random(seed)
    return {f'shard-{i}.bin': rng.randbytes(int(BLOCK_SIZE * (2.5 + i))) for i in range(3)} | {
        'labels/classes.txt': b'cat\ndog\n'}


@pytest.fixture
def mutable_s3_source(seaweed, s3_proxy, s3_source, tmp_path):
    """A prefix of its own in the S3 bucket, which the test may change."""
    prefix = f'mutable-{uuid.uuid4().hex[:8]}'
    root = tmp_path / 'mutable-src'
    manifest = write_tree(root, small_dataset(seed=prefix))
    upload_tree(seaweed.client(), S3_BUCKET, prefix + '/', root)
    return Source('s3', f's3://{S3_BUCKET}/{prefix}', s3_source.args, s3_source.env, manifest,
                  root, s3_proxy.count, extra={'client': seaweed.client(), 'prefix': prefix})


@pytest.fixture
def private_oss_source(tmp_path):
    """An OSS server of this test's own, which the test may stop."""
    server = OssServer(str(tmp_path / 'oss-data'), {OSS_KEY_ID: OSS_SECRET}).start()
    try:
        server.create_bucket(OSS_BUCKET)
        root = tmp_path / 'oss-src'
        manifest = write_tree(root, small_dataset(seed='oss'))
        for relpath in manifest:
            server.put_object(OSS_BUCKET, 'data/' + relpath, (root / relpath).read_bytes())
        env = clean_env(OSS_ACCESS_KEY_ID=OSS_KEY_ID, OSS_ACCESS_KEY_SECRET=OSS_SECRET)
        yield Source('oss', f'oss://{OSS_BUCKET}/data', ['--endpoint-url', server.endpoint],
                     env, manifest, root, server.request_count, extra={'server': server})
    finally:
        server.stop()


def free_port():
    """A TCP port on loopback that nothing listens on now (for --metrics-addr)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def live_metrics(port):
    """The Prometheus exposition a daemon serves on 127.0.0.1:`port` now."""
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as response:
        return response.read().decode()


def assert_every_bit_flip_is_refused(data, decode):
    """`decode` of `data` with any one bit flipped gives None or raises ValueError (a saved
    file's checks refuse it), never a result."""
    for offset in range(len(data)):
        for bit in range(8):
            garbled = bytearray(data)
            garbled[offset] ^= 1 << bit
            try:
                assert decode(bytes(garbled)) is None, (offset, bit)
            except ValueError:
                pass


def wait_until(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def drop_page_cache():
    """Make the next read reach the daemon instead of the kernel's page cache (root only)."""
    if not pagecache.drop_page_cache():
        pytest.skip('dropping the page cache needs root')


def wait_for_disk_writes(mounted, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = mounted.stats()
        if stats['disk_writes_pending'] == 0 and stats['disk_index_ready']:
            return stats
        time.sleep(0.05)
    raise AssertionError('the SSD writes did not finish')


def assert_tree_matches(root, manifest, threads=8):
    """Every file of `manifest` under `root` has its size and sha256 (read by 8 threads, as a
    data loader would, and because one reader at a time is slow on many small files)."""
    def check(relpath):
        path = Path(root) / relpath
        return relpath, (os.path.getsize(path), sha256_of(path))
    with ThreadPoolExecutor(threads) as pool:
        found = dict(pool.map(check, manifest))
    assert found == manifest


def block_count(manifest):
    return sum((size + BLOCK_SIZE - 1) // BLOCK_SIZE for size, _ in manifest.values())
