"""The two seeded datasets of the benchmark, generated once and reused across runs.

A dataset ("part") is a local folder of files plus its manifest of sizes and sha256 digests.
It lives under WORKDIR/datasets/<key>/, where the key holds every generation parameter, so a
run with the same parameters reuses the files and a run with other parameters gets its own
folder. The manifest is written last, atomically: a folder without one is an interrupted
generation and is generated again from scratch.

The same folder is the "local disk" system of the benchmark, and its key is the bucket prefix
the store serves it under.
"""

import fcntl
import hashlib
import hmac
import http.client
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from cachefs.demo.dataset import make_small_files, make_tfrecord_shards
from cachefs.demo.seaweed import object_key

from . import host

log = logging.getLogger(__name__)

MiB = 1 << 20
_MANIFEST = 'manifest.json'


@dataclass
class Part:
    """One dataset: where its files are locally and in the store, and what they hold."""
    kind: str          # 'shards' (TFRecord), 'small' (ImageNet-style small files) or 'names'
    #                    (N empty objects named like ImageNet's, in the store only: root None)
    key: str           # generation parameters, also the bucket prefix
    root: Path         # local folder holding the files
    entries: list      # [(relative path, size, sha256 hex)], sorted by path

    @property
    def prefix(self):
        return self.key

    @property
    def total_bytes(self):
        return sum(size for _, size, _ in self.entries)

    @property
    def paths(self):
        return [rel for rel, _, _ in self.entries]

    def describe(self):
        return f'{len(self.entries):,} files, {self.total_bytes / MiB:,.0f} MiB'


def shards_key(count, shard_size, seed):
    return f'shards-{count}x{shard_size // 1024}k-seed{seed}'


def small_key(count, folders, seed):
    return f'small-{count}-in-{folders}-seed{seed}'


def prepare(workdir, kind, count, shard_size=None, seed=0):
    """The dataset for these parameters, generated now unless a complete copy exists."""
    if kind == 'shards':
        key = shards_key(count, shard_size, seed)
    else:
        folders = min(100, count)  # ImageNet-like: 100 synset folders (fewer for tiny sets)
        key = small_key(count, folders, seed)
    base = Path(workdir) / 'datasets' / key
    manifest = base / _MANIFEST
    files = base / 'files'
    if manifest.exists():
        with open(manifest) as f:
            entries = [tuple(e) for e in json.load(f)]
        log.info('reusing dataset %s (%d files)', key, len(entries))
        return Part(kind, key, files, entries)
    host.rmtree(files)
    log.info('generating dataset %s in %s', key, files)
    if kind == 'shards':
        entries = make_tfrecord_shards(files, count=count, shard_size=shard_size, seed=seed)
    else:
        entries = make_small_files(files, count=count, folders=folders, seed=seed)
    tmp = base / (_MANIFEST + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(entries, f)
    os.replace(tmp, manifest)
    return Part(kind, key, files, [tuple(e) for e in entries])


# -- the metadata dataset: N tiny objects named like ImageNet's training set --

#: sha256 of the empty body every object of the names dataset has.
EMPTY_SHA256 = hashlib.sha256(b'').hexdigest()
IMAGENET_FOLDERS = 1000


def names_key(count, folders):
    return f'names-{count}-in-{folders}'


def imagenet_names(count, folders=IMAGENET_FOLDERS):
    """`count` relative paths n{class}/n{class}_{i}.JPEG in `folders` class folders (the layout
    of bench/listing_cost.py's synthetic listing), in S3 key order."""
    per = -(-count // folders)
    names = []
    for c in range(-(-count // per)):
        folder = f'n{c:08d}'
        names.extend(f'{folder}/{folder}_{j}.JPEG' for j in range(min(per, count - c * per)))
    names.sort()
    return names


def prepare_names(count, folders=IMAGENET_FOLDERS):
    """The names dataset: no local files (its objects are empty), only what is in the store.

    Nothing is generated on disk: the names follow from the parameters, and the store keeps
    the objects (see upload_names)."""
    entries = [(rel, 0, EMPTY_SHA256) for rel in imagenet_names(count, folders)]
    return Part('names', names_key(count, folders), None, entries)


class _Putter:
    """Empty-bodied PUTs with a SigV4 signature of our own, one keep-alive connection per thread:
    boto3 spends about 1.5 ms of CPU per PUT, which at 1.28M objects is half an hour on 2 cores."""

    def __init__(self, store):
        parts = urlsplit(store.endpoint)
        self.host, self.port = parts.hostname, parts.port
        self.netloc = parts.netloc
        self.bucket = store.bucket
        self.access_key = store.access_key
        self.secret_key = store.secret_key
        self.local = threading.local()

    def _key(self, date):
        key = hmac.new(f'AWS4{self.secret_key}'.encode(), date.encode(), hashlib.sha256).digest()
        for part in ('us-east-1', 's3', 'aws4_request'):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return key

    def path(self, key):
        return f'/{self.bucket}/{quote(key, safe="/~")}'

    def headers(self, key, stamp):
        """The headers of an empty PUT of `key` at `stamp` (YYYYMMDDTHHMMSSZ), signed."""
        scope = f'{stamp[:8]}/us-east-1/s3/aws4_request'
        request = (f'PUT\n{self.path(key)}\n\nhost:{self.netloc}\n'
                   f'x-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{stamp}\n\n'
                   f'host;x-amz-content-sha256;x-amz-date\n{EMPTY_SHA256}')
        to_sign = (f'AWS4-HMAC-SHA256\n{stamp}\n{scope}\n'
                   f'{hashlib.sha256(request.encode()).hexdigest()}')
        signature = hmac.new(self._key(stamp[:8]), to_sign.encode(), hashlib.sha256).hexdigest()
        return {'x-amz-content-sha256': EMPTY_SHA256, 'x-amz-date': stamp,
                'Content-Length': '0',
                'Authorization': (f'AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, '
                                  f'SignedHeaders=host;x-amz-content-sha256;x-amz-date, '
                                  f'Signature={signature}')}

    def put(self, key):
        conn = getattr(self.local, 'conn', None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        path = self.path(key)
        headers = self.headers(key, time.strftime('%Y%m%dT%H%M%SZ', time.gmtime()))
        for attempt in range(5):
            try:
                conn.request('PUT', path, body=b'', headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status == 200:
                    return
                if response.status < 500:
                    raise RuntimeError(f'PUT {key}: HTTP {response.status}: {body[:200]!r}')
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = self.local.conn = http.client.HTTPConnection(self.host, self.port,
                                                                    timeout=60)
            time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f'PUT {key} failed 5 times')


def upload_names(store, part, threads=16, lock_path=None, folders_per_lock=50):
    """Put the objects of the names dataset unless the store holds them already.

    Progress is kept per class folder in the store's own data folder (so it goes with the data),
    and a finished upload leaves a marker there that later runs trust. With `lock_path`, the
    upload holds that flock for `folders_per_lock` folders at a time, so that other timed runs
    on the machine can take turns."""
    data_dir = Path(store.server.data_dir)
    marker = data_dir / f'{part.key}.uploaded'
    if marker.exists():
        log.info('store already holds %s', part.key)
        return
    progress = data_dir / f'{part.key}.progress'
    done = set(progress.read_text().split()) if progress.exists() else set()
    by_folder = {}
    for rel, _, _ in part.entries:
        by_folder.setdefault(rel.split('/', 1)[0], []).append(object_key(part.prefix, rel))
    todo = [folder for folder in sorted(by_folder) if folder not in done]
    log.info('uploading %s: %d of %d folders left', part.key, len(todo), len(by_folder))
    putter = _Putter(store)
    started = time.monotonic()
    sent = 0
    with ThreadPoolExecutor(max_workers=threads) as pool, open(progress, 'a') as record:
        for first in range(0, len(todo), folders_per_lock):
            lock = open(lock_path, 'a') if lock_path else None
            try:
                if lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                for folder in todo[first:first + folders_per_lock]:
                    for _ in pool.map(putter.put, by_folder[folder]):
                        pass
                    sent += len(by_folder[folder])
                    record.write(folder + '\n')
                    record.flush()
            finally:
                if lock:
                    lock.close()
            elapsed = time.monotonic() - started
            log.info('uploaded %d objects in %.0f s (%.0f/s)', sent, elapsed, sent / elapsed)
    marker.write_text(f'{len(part.entries)}\n')
