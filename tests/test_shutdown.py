"""A (lazy) unmount and SIGTERM end the daemon within seconds, even while a store read is
stalled: the reads in flight fail (EIO, or ENOTCONN once the mount is gone) instead of the daemon
waiting out their retries (with the defaults, a minute and a half).

A plain `cachefs umount` of a mount with a file open is refused as busy (the kernel's rule), so
the unmount here is the lazy one that operators and the systemd unit's ExecStopPost use.
The store stalls through `support.faults.FaultProxy` in front of the loopback SeaweedFS; the
mounts keep the default --request-timeout and --retry-timeout, so that only the shutdown itself
can end the stalled read in time.
"""

import errno
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cachefs import daemon

from conftest import Source, clean_env, is_mounted, pid_alive, wait_until, write_tree
from support.faults import Always, ByName, FaultProxy

ROOT = Path(__file__).resolve().parent.parent
BUCKET = 'cachefs-shutdown'
STALL_SECONDS = 300            # the store never answers the stalled read by itself
EXIT_BOUND = 10.0              # the daemon is gone this soon after umount or SIGTERM
READER_BOUND = 15.0            # and the stalled reader has its error this soon


@pytest.fixture(scope='module')
def shutdown_data(seaweed, tmp_path_factory):
    root = tmp_path_factory.mktemp('shutdown-src')
    rng = random.Random('cachefs-shutdown')
    manifest = write_tree(root, {'stalled.bin': rng.randbytes(300_000),
                                 'fine.bin': rng.randbytes(300_000)})
    seaweed.create_bucket(BUCKET)
    client = seaweed.client()
    for relpath in manifest:
        client.upload_file(str(root / relpath), BUCKET, 'data/' + relpath)
    return root, manifest


@pytest.fixture
def stalling_store(seaweed, shutdown_data):
    """A source whose object 'stalled.bin' never answers (the proxy holds the request open)."""
    root, manifest = shutdown_data
    proxy = FaultProxy('127.0.0.1', seaweed.s3_port, stall_seconds=STALL_SECONDS)
    proxy.plan = ByName({'stalled.bin': Always('stall_headers')})
    with proxy:
        env = clean_env(AWS_ACCESS_KEY_ID=seaweed.access_key,
                        AWS_SECRET_ACCESS_KEY=seaweed.secret_key, AWS_DEFAULT_REGION='us-east-1')
        yield proxy, Source('s3', f's3://{BUCKET}/data', ['--endpoint-url', proxy.endpoint], env,
                            manifest, root)
        proxy.heal()


class StalledReader:
    """A thread that opens a file and reads it, recording how the read ended."""

    def __init__(self, path):
        self.path = path
        self.error = None
        self.data = None
        self.ended_at = None
        self._thread = threading.Thread(target=self._run, daemon=True, name='stalled-reader')

    def _run(self):
        try:
            with open(self.path, 'rb') as f:
                self.data = f.read()
        except OSError as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def start(self, proxy):
        stalls = proxy.injected['stall_headers']
        self._thread.start()
        assert wait_until(lambda: proxy.injected['stall_headers'] > stalls, timeout=15), \
            'the read never reached the store'
        return self

    def join(self, timeout):
        self._thread.join(timeout)
        return not self._thread.is_alive()


def assert_read_failed(reader, since):
    assert reader.join(READER_BOUND), f'the stalled read still waits after {READER_BOUND:g}s'
    assert reader.data is None, 'a stalled read returned data'
    assert reader.error is not None and reader.error.errno in (errno.EIO, errno.ENOTCONN), \
        reader.error
    print(f'\nthe stalled read failed with {errno.errorcode[reader.error.errno]} '
          f'{reader.ended_at - since:.2f}s after the stop')


def wait_for_exit(pid, bound):
    started = time.monotonic()
    assert wait_until(lambda: not pid_alive(pid), timeout=bound), \
        f'daemon {pid} still runs {bound:g}s after the stop'
    return time.monotonic() - started


@pytest.mark.fuse
def test_lazy_unmount_while_a_store_read_is_stalled_fails_the_read_and_the_daemon_exits_in_seconds(
        stalling_store, mounter):
    # The reader holds the file open, so a plain `cachefs umount` is refused as busy; what
    # unmounts a busy mount is a lazy one (`fusermount3 -u -z`, as the systemd unit's
    # ExecStopPost and most operators do), after which the kernel keeps the mount for the
    # reader and says nothing to the daemon until the reader is done.
    proxy, source = stalling_store
    mounted = mounter.mount(source)
    reader = StalledReader(mounted.path / 'stalled.bin').start(proxy)
    stopped = time.monotonic()
    subprocess.run(['fusermount3', '-u', '-z', str(mounted.path)], check=True)
    elapsed = wait_for_exit(mounted.pid, EXIT_BOUND)
    print(f'daemon gone {elapsed:.2f}s after the lazy unmount')
    assert_read_failed(reader, stopped)
    assert not is_mounted(mounted.path)


@pytest.mark.fuse
def test_sigterm_while_a_store_read_is_stalled_fails_the_read_and_the_daemon_exits_in_seconds(
        stalling_store, mounter):
    proxy, source = stalling_store
    mounted = mounter.mount(source)
    reader = StalledReader(mounted.path / 'stalled.bin').start(proxy)
    stopped = time.monotonic()
    os.kill(mounted.pid, signal.SIGTERM)
    elapsed = wait_for_exit(mounted.pid, EXIT_BOUND)
    print(f'daemon gone {elapsed:.2f}s after SIGTERM')
    assert_read_failed(reader, stopped)
    assert wait_until(lambda: not is_mounted(mounted.path), timeout=5)
    # the read was answered: the daemon did not have to abandon the FUSE loop (its last resort,
    # after a grace period, for requests that nothing else ends)
    assert 'still unanswered' not in mounted.log_file.read_text()


def test_the_systemd_stop_timeout_covers_the_daemons_own_stop_bounds():
    unit = (ROOT / 'packaging' / 'systemd' / 'cachefs@.service').read_text()
    timeout = int(re.search(r'^TimeoutStopSec=(\d+)s$', unit, re.MULTILINE).group(1))
    # the grace for FUSE requests, then the SSD flush, with room for closing the store
    assert timeout >= daemon._STOP_GRACE + daemon._FLUSH_TIMEOUT + 5
