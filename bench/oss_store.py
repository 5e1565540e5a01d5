"""The OSS test server (tests/support/oss_server.py) as the store of the OSS benchmarks
(bench/oss_cost.py, bench/oss_epochs.py): objects written into its folder directly (no HTTP
upload) once per dataset, the server run as a child process on loopback, so that its CPU is
not the measured process's.

The server is pure Python (http.server threads) and shares the machine's cores with the client:
its MiB/s say little about a real OSS endpoint, so the OSS figures are ratios to raw oss2 reads
through the same server in the same run (bench/oss_epochs.py also shows the server's CPU).
"""

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import host

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / 'tests' / 'support' / 'oss_server.py'
BUCKET = 'cachefs-bench'
KEY_ID, SECRET = 'bench-key', 'bench-secret'


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class OssStore:
    def __init__(self, workdir):
        self.root = Path(workdir) / 'oss-store'
        self.port = None
        self._proc = None
        self._token = None

    @property
    def endpoint(self):
        return f'http://127.0.0.1:{self.port}'

    def env(self):
        return {'OSS_ACCESS_KEY_ID': KEY_ID, 'OSS_ACCESS_KEY_SECRET': SECRET}

    def ensure(self, part):
        """Write the dataset's files into the server's folder unless done before (the server
        must not be running)."""
        marker = self.root / f'.complete-{part.key}'
        if marker.exists():
            return
        sys.path.insert(0, str(REPO / 'tests'))
        from support.oss_server import Storage
        storage = Storage(str(self.root))
        storage.create_bucket(BUCKET)
        log.info('writing %s into the OSS test server folder', part.describe())
        for rel, _, _ in part.entries:
            with open(part.root / rel, 'rb') as f:
                storage.put_object(BUCKET, f'{part.prefix}/{rel}', iter(lambda: f.read(1 << 20),
                                                                         b''))
        marker.touch()

    def start(self):
        self.port = _free_port()
        self._proc = subprocess.Popen(
            [sys.executable, str(SERVER), '--root', str(self.root), '--port', str(self.port),
             '--key', f'{KEY_ID}:{SECRET}'], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self._token = host.on_cleanup('OSS test server', self.stop)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                return
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError('the OSS test server exited at start') from None
                time.sleep(0.1)
        raise RuntimeError('the OSS test server did not start')

    def pid(self):
        return self._proc.pid

    def stop(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._token is not None:
            host.done(self._token)
            self._token = None
