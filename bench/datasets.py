"""The two seeded datasets of the benchmark, generated once and reused across runs.

A dataset ("part") is a local folder of files plus its manifest of sizes and sha256 digests.
It lives under WORKDIR/datasets/<key>/, where the key holds every generation parameter, so a
run with the same parameters reuses the files and a run with other parameters gets its own
folder. The manifest is written last, atomically: a folder without one is an interrupted
generation and is generated again from scratch.

The same folder is the "local disk" system of the benchmark, and its key is the bucket prefix
the store serves it under.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cachefs.demo.dataset import make_small_files, make_tfrecord_shards

from . import host

log = logging.getLogger(__name__)

MiB = 1 << 20
_MANIFEST = 'manifest.json'


@dataclass
class Part:
    """One dataset: where its files are locally and in the store, and what they hold."""
    kind: str          # 'shards' (TFRecord) or 'small' (ImageNet-style small files)
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
