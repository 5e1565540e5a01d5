"""Credentials that expire (instance roles, IRSA, STS) are refreshed off the FUSE loop, ahead of
expiry, and a failed refresh is retried: reads never fail and metadata keeps being answered.

A container-credentials endpoint on loopback (botocore reads AWS_CONTAINER_CREDENTIALS_FULL_URI)
hands out credentials lasting 10 s, rotating through three keys that a SeaweedFS of this
module's own accepts (SeaweedFS refuses an unknown session token, so the sets carry none). Its
answers are sometimes slow (1.5 s), sometimes later than botocore's 2 s timeout, and sometimes
500 three times in a row (one whole refresh fails). For 28 s, across several expiries, readers
read files through a mount that keeps almost nothing in memory, and a prober stats files and
lists the folder with 0.1 s kernel timeouts, so that each request reaches the daemon.
"""

import datetime
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cachefs.demo.seaweed import SeaweedServer

from conftest import Source, clean_env, write_tree

pytestmark = pytest.mark.fuse

BUCKET = 'cachefs-credentials'
LIFETIME = 10.0            # seconds each set of credentials lasts
RUN_SECONDS = 28.0         # a little under three lifetimes
KEYS = [(f'rotating-key-{i}', f'rotating-secret-{i}-Xq7') for i in range(3)]
# What the endpoint does with each request once the mount is up, in order and round again
# (until then it answers at once): about one refresh every LIFETIME / 2 seconds.
CYCLE = ['slow', 'fail', 'fail', 'fail', 'ok', 'ok', 'late', 'ok']
SLOW_SECONDS = 1.5         # under botocore's 2 s timeout for this endpoint
LATE_SECONDS = 2.5         # over it: botocore gives up on this answer and asks again
LIVENESS_BOUND = 1.0       # no metadata request may take this long


class RotatingKeysSeaweed(SeaweedServer):
    """SeaweedFS with one identity that has several keys."""

    def _write_s3_config(self):
        credentials = [{'accessKey': self.access_key, 'secretKey': self.secret_key}]
        credentials += [{'accessKey': key, 'secretKey': secret} for key, secret in KEYS]
        config = {'identities': [{'name': 'cachefs', 'credentials': credentials,
                                  'actions': ['Admin', 'Read', 'Write', 'List']}]}
        path = self.data_dir / 's3.json'
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump(config, f)


class CredentialsEndpoint:
    """The container credentials endpoint of ECS/EKS, on loopback, with a script of answers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.scripted = 0          # requests answered by the script
        self.answers = {'ok': 0, 'slow': 0, 'late': 0, 'fail': 0}
        self.issued = 0
        self.script = False
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                endpoint.answer(self)

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v2/credentials'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name='credentials-endpoint')

    def answer(self, handler):
        with self.lock:
            kind = 'ok'
            if self.script:
                kind = CYCLE[self.scripted % len(CYCLE)]
                self.scripted += 1
                self.answers[kind] += 1
        if kind == 'fail':
            body = b'{"message": "internal error"}'
            handler.send_response(500)
        else:
            if kind in ('slow', 'late'):
                time.sleep(SLOW_SECONDS if kind == 'slow' else LATE_SECONDS)
            with self.lock:
                key, secret = KEYS[self.issued % len(KEYS)]
                self.issued += 1
            expiry = datetime.datetime.now(datetime.timezone.utc) + \
                datetime.timedelta(seconds=LIFETIME)
            body = json.dumps({'AccessKeyId': key, 'SecretAccessKey': secret, 'Token': '',
                               'Expiration': expiry.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}).encode()
            handler.send_response(200)
        handler.send_header('Content-Type', 'application/json')
        handler.send_header('Content-Length', str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass         # botocore gave up on a late answer

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope='module')
def rotating_seaweed(tmp_path_factory):
    folder = tmp_path_factory.mktemp('seaweed-rotating')
    server = RotatingKeysSeaweed(folder / 'data', log_path=folder / 'weed.log')
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=2)


@pytest.fixture(scope='module')
def credential_data(rotating_seaweed, tmp_path_factory):
    root = tmp_path_factory.mktemp('credentials-src')
    rng = random.Random('cachefs-credentials')
    manifest = write_tree(root, {f'part-{i}.bin': rng.randbytes(1_500_000) for i in range(8)})
    rotating_seaweed.create_bucket(BUCKET)
    client = rotating_seaweed.client()
    for relpath in manifest:
        client.upload_file(str(root / relpath), BUCKET, 'data/' + relpath)
    return root, manifest


def read_uncached(path):
    """The file's bytes, then its pages dropped from the kernel's page cache, so that the next
    read asks the daemon again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return b''.join(parts)
    finally:
        os.close(fd)


@pytest.mark.expected_log(r'WARNING botocore\.credentials: Refreshing temporary credentials failed '
                          r'during mandatory refresh period')
def test_expiring_credentials_are_refreshed_off_the_fuse_loop_and_reads_never_fail(
        rotating_seaweed, credential_data, mounter):
    root, manifest = credential_data
    with CredentialsEndpoint() as endpoint:
        env = clean_env(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url,
                        AWS_DEFAULT_REGION='us-east-1')
        source = Source('s3', f's3://{BUCKET}/data',
                        ['--endpoint-url', rotating_seaweed.endpoint], env, manifest, root)
        mounted = mounter.mount(source, '--cache-size', '0', '--memory-cache-size', '2M',
                                '--prefetch-window', '0', '--attr-timeout', '0.1s',
                                '--entry-timeout', '0.1s', '--retry-timeout', '20s',
                                '--request-timeout', '5s')
        issued_at_mount = endpoint.issued
        endpoint.script = True
        stop = threading.Event()
        deadline = time.monotonic() + RUN_SECONDS

        def reader(seed):
            rng = random.Random(seed)
            reads, errors = 0, []
            while time.monotonic() < deadline:
                relpath = rng.choice(sorted(manifest))
                try:
                    data = read_uncached(mounted.path / relpath)
                except OSError as exc:
                    errors.append(f'{relpath}: {exc}')
                    continue
                if (len(data), hashlib.sha256(data).hexdigest()) != manifest[relpath]:
                    errors.append(f'{relpath}: wrong bytes')
                reads += 1
            return reads, errors

        def prober():
            latencies = []
            names = sorted(manifest)
            while not stop.is_set():
                for call, arg in ((os.stat, mounted.path / random.choice(names)),
                                  (os.listdir, mounted.path)):
                    started = time.monotonic()
                    call(arg)
                    latencies.append(time.monotonic() - started)
                time.sleep(0.02)
            return latencies

        with ThreadPoolExecutor(4) as pool:
            probing = pool.submit(prober)
            results = list(pool.map(reader, range(2)))
            stop.set()
            latencies = probing.result()
        stats = mounted.stats()

    reads = sum(r for r, _ in results)
    errors = [e for _, errs in results for e in errs]
    worst = max(latencies)
    print(f'\n{reads} whole-file reads ({stats["store_requests"]} store requests) in '
          f'{RUN_SECONDS:g}s; credentials endpoint: {endpoint.scripted} requests during the '
          f'run, {endpoint.issued - issued_at_mount} sets issued, answers {endpoint.answers}; '
          f'{len(latencies)} metadata requests, worst {worst * 1000:.0f} ms, '
          f'median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms')
    assert errors == []
    assert reads >= 20
    # several sets expired during the run, and the endpoint's slow, late and failing answers
    # all came up
    assert endpoint.issued - issued_at_mount >= 4
    assert endpoint.answers['slow'] and endpoint.answers['late'] and endpoint.answers['fail'] >= 3
    log = mounted.log_file.read_text()
    assert 'refreshing the AWS credentials failed' in log     # ... and it was retried
    assert worst < LIVENESS_BOUND
