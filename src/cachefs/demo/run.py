"""`cachefs demo`: the main job on the embedded default, end to end on one machine.

Starts SeaweedFS on loopback, generates seeded TFRecord shards of image samples, uploads them,
mounts the bucket prefix with cachefs, and reads the dataset twice the way a training input
pipeline does (4 reader threads, shuffled shard order, every record parsed and CRC-checked).
The first epoch streams from the store; the second is served from the cache. It prints both
rates and the store requests of each epoch, checks every file's sha256, and cleans up.
"""

import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import control
from ..errors import EXIT_INTERNAL, EXIT_OK, EXIT_STORE, UserError
from ..units import format_size, parse_size
from .dataset import file_sha256, make_tfrecord_shards, parse_sample
from .pagecache import drop_page_cache
from .seaweed import SeaweedServer, upload_tree
from .tfrecord import iter_records

log = logging.getLogger(__name__)

BUCKET = 'cachefs-demo'
PREFIX = 'imagenet-tfrecords/'


def read_stats(mountpoint):
    """The daemon's counters, through the control protocol (as `cachefs stats` reads them)."""
    return control.open_mount(mountpoint).stats()


def _read_epoch(mountpoint, names, seed):
    """Parse every record of every shard, 4 readers, shuffled order: (bytes, records, seconds)."""
    order = list(names)
    random.Random(seed).shuffle(order)

    def read_shard(name):
        total = records = 0
        with open(os.path.join(mountpoint, name), 'rb', buffering=1 << 20) as f:
            for payload in iter_records(f, verify=True):
                label, height, width, pixels = parse_sample(payload)
                total += len(payload)
                records += 1
        return total, records

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_shard, order))
    return sum(r[0] for r in results), sum(r[1] for r in results), time.perf_counter() - started


def run_demo(options):
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix='cachefs-demo-'))
    keep = options.workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    mountpoint = workdir / 'mnt'
    mountpoint.mkdir(exist_ok=True)
    shard_size = parse_size(options.shard_size)
    server = SeaweedServer(workdir / 'seaweedfs', log_path=workdir / 'seaweedfs.log')
    mounted = False
    try:
        print(f'generating {options.shards} TFRecord shards of {format_size(shard_size)} '
              f'in {workdir / "dataset"}')
        entries = make_tfrecord_shards(workdir / 'dataset', count=options.shards,
                                       shard_size=shard_size, seed=1)
        print('starting SeaweedFS on loopback and uploading')
        try:
            server.start()
        except RuntimeError as exc:
            raise UserError(f'the demo store did not start: {exc}', EXIT_STORE) from None
        server.create_bucket(BUCKET)
        upload_tree(server.client(), BUCKET, PREFIX, workdir / 'dataset')

        source = f's3://{BUCKET}/{PREFIX}'
        env = dict(os.environ, **server.env())
        command = [sys.executable, '-m', 'cachefs', 'mount', source, str(mountpoint),
                   '--endpoint-url', server.endpoint, '--cache-dir', str(workdir / 'cache'),
                   '--log-file', str(workdir / 'cachefs.log')]
        print('$ ' + ' '.join(command[2:]))
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise UserError('the demo mount failed; see ' + str(workdir / 'cachefs.log'),
                            result.returncode)
        mounted = True

        names = [name for name, _, _ in entries]
        for epoch in (1, 2):
            if epoch == 2:
                drop_page_cache()
            before = read_stats(mountpoint)['store_requests']
            total, records, seconds = _read_epoch(mountpoint, names, seed=epoch)
            requests = read_stats(mountpoint)['store_requests'] - before
            print(f'epoch {epoch}: {records} records, {format_size(total)} in {seconds:.2f}s = '
                  f'{total / seconds / 2**20:.0f} MiB/s, {records / seconds:.0f} samples/s, '
                  f'{requests} store requests')

        bad = [name for name, size, digest in entries
               if file_sha256(mountpoint / name) != digest]
        print(f'sha256 of {len(entries)} files: ' + ('all match' if not bad else f'MISMATCH {bad}'))
        stats = read_stats(mountpoint)
        print(f"cache: {stats['hits']} block hits, {stats['misses']} misses, "
              f"{format_size(stats['store_bytes'])} read from the store")
        return EXIT_OK if not bad else EXIT_INTERNAL
    finally:
        if mounted:
            subprocess.run([sys.executable, '-m', 'cachefs', 'umount', str(mountpoint)])
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
