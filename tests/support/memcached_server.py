"""One memcached with extstore on loopback: a cluster peer for tests that need the cluster tier
switched on (its metrics, its options) but not the three-node rig (cluster_rig.py).

    with memcached_server() as address:           # '127.0.0.1:PORT'
        mounter.mount(source, '--cluster', f'memcached://{address}')

Small sizes (64 MiB of memory, a 64 MiB extstore file in a folder of its own, removed after),
items up to 8 MiB (memcached wants write buffers at least that large, and pages a multiple of
them), settings as deploy/cluster/memcached.yaml orders them (ext_page_size before ext_path).
As root it runs as `nobody` (memcached refuses root without -u). Stopped by PID.
"""

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MEMCACHED = '/usr/bin/memcached'


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _answers(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def dead_address():
    """'127.0.0.1:PORT' where nothing listens: a peer that refuses every connection."""
    return f'127.0.0.1:{_free_port()}'


@contextmanager
def memcached_server(timeout=30):
    if not Path(MEMCACHED).exists():
        import pytest
        pytest.skip(f'{MEMCACHED} is absent (Debian package memcached)')
    folder = Path(tempfile.mkdtemp(prefix='cachefs-memcached-'))
    port = _free_port()
    argv = [MEMCACHED, '-l', '127.0.0.1', '-p', str(port), '-U', '0', '-m', '64', '-I', '8m',
            '-c', '256', '-o', 'ext_page_size=8,ext_wbuf_size=8,ext_threads=1,ext_item_age=0,'
            f'ext_path={folder}/extstore:64M']
    if os.geteuid() == 0:
        shutil.chown(folder, 'nobody')
        argv += ['-u', 'nobody']
    log_file = folder.with_suffix('.log')
    with open(log_file, 'w') as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            assert process.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, f'memcached does not answer on {port}'
            time.sleep(0.05)
        yield f'127.0.0.1:{port}'
    finally:
        process.kill()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
        log_file.unlink(missing_ok=True)
