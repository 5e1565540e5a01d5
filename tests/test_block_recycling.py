"""Recycled block buffers on a real mount (ufs/block_buffers.py; the rule in cache/blocks.py): many
readers under eviction pressure, whole-file and random reads, several epochs, with and without
the SSD tier (whose writers give buffers back too), read every byte right while the daemon
reuses buffers."""

import hashlib
import os
import random
import threading
import time
import uuid

import pytest

from conftest import BLOCK_SIZE, S3_BUCKET, Source, drop_page_cache, upload_tree, write_tree

pytestmark = pytest.mark.fuse


@pytest.fixture
def pressure_source(seaweed, s3_proxy, s3_source, tmp_path):
    """24 files of 1.3-3.7 blocks' worth of random bytes (about 60 MiB at 1 MiB blocks) under a
    prefix of their own: four times the memory tier the tests give."""
    prefix = f'recycling-{uuid.uuid4().hex[:8]}'
    rng = random.Random(prefix)
    files = {f'part-{i:02}.bin': rng.randbytes(int(BLOCK_SIZE * rng.uniform(1.3, 3.7)))
             for i in range(24)}
    root = tmp_path / 'recycling-src'
    manifest = write_tree(root, files)
    upload_tree(seaweed.client(), S3_BUCKET, prefix + '/', root)
    return Source('s3', f's3://{S3_BUCKET}/{prefix}', s3_source.args, s3_source.env, manifest,
                  root, s3_proxy.count, extra={'files': files})


def read_epoch(mount, files, seed):
    """16 threads read every file whole (sha256) in a shuffled order while 4 threads read
    random ranges and compare them with the source; returns the mismatches, the reads that
    failed and the threads still reading after 300 s."""
    names = sorted(files)
    random.Random(seed).shuffle(names)
    wrong = []

    def whole(part):
        for name in part:
            with open(mount / name, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != hashlib.sha256(files[name]).hexdigest():
                wrong.append(name)

    def ranges(rng):
        for _ in range(60):
            name = rng.choice(names)
            data = files[name]
            offset = rng.randrange(len(data))
            length = rng.choice((1, 4096, 100_000, BLOCK_SIZE + 17))
            fd = os.open(mount / name, os.O_RDONLY)
            try:
                got = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            if got != data[offset:offset + length]:
                wrong.append(f'{name}@{offset}+{length}')

    def failing(read, *args):
        try:
            read(*args)
        except Exception as exc:        # an EIO, say: a failed read, not a thread's warning
            wrong.append(f'{read.__name__}: {exc!r}')

    threads = [threading.Thread(target=failing, args=(whole, names[i::16])) for i in range(16)]
    threads += [threading.Thread(target=failing, args=(ranges, random.Random(seed * 10 + i)))
                for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    for thread in threads:
        thread.join(timeout=max(0, deadline - time.monotonic()))
    wrong += [f'{thread.name} still reading after 300 s' for thread in threads
              if thread.is_alive()]
    return wrong


@pytest.mark.parametrize('ssd_tier', [True, False], ids=['ssd-tier', 'memory-only'])
def test_many_readers_under_eviction_pressure_read_every_byte_while_buffers_are_reused(
        pressure_source, mounter, ssd_tier):
    options = ['--memory-cache-size', '16M', '--prefetch-memory', '8M']
    if not ssd_tier:
        options += ['--cache-size', '0']
    mounted = mounter.mount(pressure_source, *options)
    files = pressure_source.extra['files']
    for epoch in range(3):
        drop_page_cache()
        assert read_epoch(mounted.path, files, seed=epoch) == []
    mounter.umount(mounted)
    assert 'reusing the buffers of blocks nobody reads any more' in mounted.log_file.read_text()
