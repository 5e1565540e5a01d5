"""What is measured: each scenario, for one system and one round, recorded as samples.

A scenario is a function `(bench, system, round)`. It mounts what it needs (a fresh, empty cache
whenever something "cold" is measured), reads, and records one `Sample` per figure: the value,
plus the serving process's CPU seconds during that figure and its peak RSS so far, plus the
cachefs counters that changed. `ROWS` lists every figure in the order of the report (and
`OBJECT_ROWS` those of the metadata-objects scenario, in a table of their own).

Conditions, per figure:
- cold: new mount on an empty cache folder, page cache dropped (so the store reads its disk);
- warm, page cache dropped: same mount, after a full read; the daemon's own cache serves;
- warm, page cache kept: read again at once; the kernel serves what it kept.
`local` is the dataset folder itself (cold = page cache dropped); `boto3` reads the store with no
file system (parallel ranged GETs; whole-object GETs for small files; ListObjectsV2 for metadata).

Content is verified (sha256 of every file against the manifest, and the listing) in a separate,
untimed pass, once per system and dataset in the first round, after dropping the page cache so
that the system itself serves the bytes.
"""

import hashlib
import logging
import os
import random
import subprocess
import time
from dataclasses import dataclass, field

from . import host
from .workers import map_threads, parse_tfrecord, read_file, read_in_processes, \
    read_small_files, verify_tree

log = logging.getLogger(__name__)

MiB = 1 << 20
RANGE_SIZE = 8 * MiB       # boto3 ranged GETs, as a tuned S3 client would issue them
STORE_THREADS = 8


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True


ROWS = (
    Row('cold', 'cold epoch, 4 reader processes', 'MiB/s'),
    Row('warm_dropped', 'warm epoch, page cache dropped', 'MiB/s'),
    Row('warm_kept', 'warm epoch, page cache kept', 'MiB/s'),
    Row('tfrecord_cold', 'TFRecord pipeline (parse + CRC), cold', 'samples/s'),
    Row('tfrecord_warm', 'TFRecord pipeline, warm, page cache dropped', 'samples/s'),
    Row('mount', 'mount small files, empty cache (boto3: list all keys)', 's', False),
    Row('remount', 'remount small files, cache kept', 's', False),
    Row('find_1', '`find` small files after remount, 1st', 's', False),
    Row('find_2', '`find` small files, 2nd', 's', False),
    Row('walk_1', 'walk + stat small files after remount, 1st', 's', False),
    Row('walk_2', 'walk + stat small files, 2nd', 's', False),
    Row('small_first', 'small files, first read, 8 threads', 'files/s'),
    Row('small_warm_dropped', 'small files, warm, page cache dropped', 'files/s'),
    Row('small_warm_kept', 'small files, warm, page cache kept', 'files/s'),
)
#: metadata-objects: N empty objects in 1,000 folders (--metadata-objects); a table of their own
OBJECT_ROWS = (
    Row('objects_first', 'N objects: mount, empty cache, to first `ls` (boto3: list all keys)',
        's', False),
    Row('objects_remount', 'N objects: remount, cache kept, to first `ls`', 's', False),
    Row('objects_find_1', 'N objects: `find` after remount, 1st', 's', False),
    Row('objects_find_2', 'N objects: `find`, 2nd', 's', False),
    Row('objects_walk_1', 'N objects: walk + stat after remount, 1st', 's', False),
    Row('objects_walk_2', 'N objects: walk + stat, 2nd', 's', False),
)
ROW_BY_KEY = {row.key: row for row in ROWS + OBJECT_ROWS}
#: Rows whose condition is "cold": compared with the raw store (boto3) too.
COLD_ROWS = ('cold', 'small_first', 'mount', 'objects_first')

#: cachefs counters whose change is kept with each sample.
STAT_KEYS = ('store_requests', 'store_bytes', 'hits', 'memory_hits', 'disk_hits', 'misses',
             'prefetched_bytes', 'disk_writes', 'disk_write_bytes', 'evictions',
             'store_errors', 'store_retries', 'disk_corrupt_blocks')


@dataclass
class Sample:
    row: str
    system: str
    round: int
    value: float
    cpu_s: float = None
    peak_rss: int = None
    extra: dict = field(default_factory=dict)


class Bench:
    """The state of one run: the store, the datasets, the options and everything recorded."""

    def __init__(self, options, store, parts, rundir):
        self.options = options
        self.store = store
        self.parts = parts            # {'shards': Part, 'small': Part}
        self.rundir = rundir
        self.samples = []
        self.oversubscription = []    # one dict per (policy, round, epoch)
        self.sweep = []               # one dict per (block size, round)
        self.verified = {}            # (system, dataset kind) -> list of problems ([] = ok)
        self.notes = []

    def record(self, sample):
        self.samples.append(sample)
        log.info('%-8s %-20s round %d: %.4g %s', sample.system, sample.row, sample.round,
                 sample.value, ROW_BY_KEY[sample.row].unit if sample.row in ROW_BY_KEY else '')

    def note(self, text):
        log.warning('%s', text)
        if text not in self.notes:
            self.notes.append(text)

    def cache_dir(self, system, fresh):
        path = self.rundir / 'cache' / system.name
        if fresh:
            host.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def mount(self, system, part, fresh=True, **options):
        """Mount `part` with `system` (on an empty cache when `fresh`)."""
        return system.mount(part, self.cache_dir(system, fresh), **options)

    def order(self, part, label, rnd):
        """Paths of `part` in a shuffled order that is the same for every system of a round."""
        paths = list(part.paths)
        random.Random(f'{self.options.seed}:{label}:{rnd}').shuffle(paths)
        return paths

    def drop(self):
        if not host.drop_page_cache():
            self.note('not root: the page cache could not be dropped, "cold" and "page cache '
                      'dropped" figures are served partly by the kernel')


class Probe:
    """CPU, peak RSS and cachefs counters of a mount around one measured operation."""

    def __init__(self, mount):
        self.mount = mount
        self.cpu_s = self.peak_rss = None
        self.stats = {}

    def __enter__(self):
        self._cpu0, _ = self.mount.usage()
        self._stats0 = self.mount.stats()
        return self

    def __exit__(self, *exc):
        cpu1, self.peak_rss = self.mount.usage()
        if self._cpu0 is not None and cpu1 is not None:
            self.cpu_s = cpu1 - self._cpu0
        stats1 = self.mount.stats()
        if self._stats0 is not None and stats1 is not None:
            self.stats = {k: stats1[k] - self._stats0[k] for k in STAT_KEYS
                          if k in stats1 and k in self._stats0}


def since_start(mount):
    """A probe covering the serving process's whole life so far (for mount times)."""
    probe = Probe(mount)
    probe.cpu_s, probe.peak_rss = mount.usage()
    return probe


class ClientProbe:
    """CPU of this process (boto3's threads run here) around one measured operation."""
    peak_rss = None
    stats = {}

    def __enter__(self):
        self._cpu0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.cpu_s = time.process_time() - self._cpu0


def _sample(bench, row, system, rnd, value, probe, **extra):
    extra.update(probe.stats)
    if probe.stats.get('store_errors') or probe.stats.get('disk_corrupt_blocks'):
        bench.note(f'{system.name} {row} round {rnd + 1}: {probe.stats.get("store_errors")} '
                   f'store errors, {probe.stats.get("disk_corrupt_blocks")} corrupt blocks')
    bench.record(Sample(row, system.name, rnd, value, probe.cpu_s, probe.peak_rss, extra))


def _epoch(bench, function, paths):
    return read_in_processes(function, paths, bench.options.readers)


def _full_paths(mount, paths):
    return [os.path.join(mount.path, p) for p in paths]


# -- content checks --

def verify(bench, system, part, mount):
    """sha256 of every file of `part` as `system` serves it, page cache dropped first."""
    if (system.name, part.kind) in bench.verified:
        return
    bench.drop()
    started = time.monotonic()
    problems = verify_tree(mount.path, part.entries)
    _verified(bench, system, part, problems, started)


def _verified(bench, system, part, problems, started):
    bench.verified[(system.name, part.kind)] = problems
    if problems:
        bench.note(f'CONTENT MISMATCH: {system.name} served {part.kind} with {len(problems)} '
                   f'problems, e.g. {problems[:3]}')
    else:
        log.info('%s %s: all %d files match their sha256 (%.1f s)', system.name, part.kind,
                 len(part.entries), time.monotonic() - started)


def verify_store(bench, system, part):
    """sha256 of every object of `part` as GET returns it."""
    if (system.name, part.kind) in bench.verified:
        return
    client = bench.store.client()
    started = time.monotonic()

    def check(entry):
        rel, size, digest = entry
        body = client.get_object(Bucket=bench.store.bucket, Key=f'{part.prefix}/{rel}')['Body']
        sha = hashlib.sha256()
        got = 0
        for chunk in iter(lambda: body.read(MiB), b''):
            sha.update(chunk)
            got += len(chunk)
        return None if (got, sha.hexdigest()) == (size, digest) else f'{rel}: differs'

    problems = [p for p in map_threads(check, part.entries, 4) if p]
    _verified(bench, system, part, problems, started)


def verify_missing(bench, systems, parts_used):
    """Verify, on a fresh mount, every (system, dataset) that no scenario has verified yet."""
    for system in systems:
        for kind in parts_used:
            part = bench.parts[kind]
            if kind == 'names' or (system.name, kind) in bench.verified:
                # the names dataset's objects are empty: the scenario counts what it lists
                continue
            if system.kind == 'store':
                verify_store(bench, system, part)
                continue
            with bench.mount(system, part, fresh=True) as mount:
                verify(bench, system, part, mount)


# -- boto3, the raw store --

def _store_ranges(part, paths):
    sizes = {rel: size for rel, size, _ in part.entries}
    return [(f'{part.prefix}/{rel}', offset, min(RANGE_SIZE, sizes[rel] - offset))
            for rel in paths for offset in range(0, sizes[rel], RANGE_SIZE)]


def store_read(bench, jobs):
    """GET each (key, offset, length) (length None: the whole object), STORE_THREADS at a time."""
    client = bench.store.client()
    bucket = bench.store.bucket

    def get(job):
        key, offset, length = job
        if length is None:
            return len(client.get_object(Bucket=bucket, Key=key)['Body'].read())
        body = client.get_object(Bucket=bucket, Key=key,
                                 Range=f'bytes={offset}-{offset + length - 1}')['Body'].read()
        if len(body) != length:
            raise RuntimeError(f'{key}: short ranged GET ({len(body)} of {length} bytes)')
        return length

    started = time.perf_counter()
    total = sum(map_threads(get, jobs, STORE_THREADS))
    return total, time.perf_counter() - started


# -- the scenarios --

def epochs(bench, system, rnd):
    """Cold epoch, then warm with the page cache dropped, then warm with it kept (shards)."""
    part = bench.parts['shards']
    if system.kind == 'store':
        bench.drop()
        with ClientProbe() as probe:
            total, seconds = store_read(bench, _store_ranges(part, bench.order(part, 'cold', rnd)))
        _sample(bench, 'cold', system, rnd, total / MiB / seconds, probe, seconds=seconds)
        if rnd == 0:
            verify_store(bench, system, part)
        return
    with bench.mount(system, part) as mount:
        for row, drop in (('cold', True), ('warm_dropped', True), ('warm_kept', False)):
            paths = _full_paths(mount, bench.order(part, row, rnd))
            if drop:
                bench.drop()
            with Probe(mount) as probe:
                total, _, seconds = _epoch(bench, read_file, paths)
            _check_bytes(bench, system, row, total, part)
            _sample(bench, row, system, rnd, total / MiB / seconds, probe, seconds=seconds)
        if rnd == 0:
            verify(bench, system, part, mount)


def _check_bytes(bench, system, row, total, part):
    if total != part.total_bytes:
        bench.note(f'{system.name} {row}: read {total} bytes, the dataset has {part.total_bytes}')


def tfrecord(bench, system, rnd):
    """A training input pipeline: every record parsed and CRC-checked, cold then warm."""
    if system.kind == 'store':
        return
    part = bench.parts['shards']
    with bench.mount(system, part) as mount:
        for row in ('tfrecord_cold', 'tfrecord_warm'):
            paths = _full_paths(mount, bench.order(part, row, rnd))
            bench.drop()
            with Probe(mount) as probe:
                total, records, seconds = _epoch(bench, parse_tfrecord, paths)
            _sample(bench, row, system, rnd, records / seconds, probe, seconds=seconds,
                    mib_s=total / MiB / seconds, records=records)


class Stopped(Exception):
    """A figure that ran past --peer-timeout and was stopped."""


def _find(bench, system, mount, part, timeout=3600):
    started = time.perf_counter()
    try:
        result = subprocess.run(['find', mount.path, '-type', 'f'], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Stopped() from None
    seconds = time.perf_counter() - started
    found = result.stdout.count(b'\n')
    if result.returncode != 0 or found != len(part.entries):
        bench.note(f'{system.name}: find listed {found} of {len(part.entries)} files '
                   f'(exit {result.returncode}: {result.stderr[-200:].decode(errors="replace")})')
    return seconds


def _walk_stat(bench, system, mount, part, timeout=None):
    """Seconds to stat every file; past `timeout` (checked every 1,000 files), `Stopped`."""
    started = time.perf_counter()
    deadline = started + timeout if timeout is not None else None
    found = 0
    for dirpath, _, filenames in os.walk(mount.path):
        for name in filenames:
            os.stat(os.path.join(dirpath, name))
            found += 1
            if deadline is not None and not found % 1000 and time.perf_counter() > deadline:
                raise Stopped()
    seconds = time.perf_counter() - started
    if found != len(part.entries):
        bench.note(f'{system.name}: walk saw {found} of {len(part.entries)} files')
    return seconds


def _two_passes(bench, system, rnd, mount, part, function, rows):
    bench.drop()
    for row in rows:
        with Probe(mount) as probe:
            seconds = function(bench, system, mount, part)
        _sample(bench, row, system, rnd, seconds, probe)


def metadata(bench, system, rnd):
    """Mount, then `find` and walk + stat of the small files, each right after a remount."""
    part = bench.parts['small']
    if system.kind == 'store':
        client = bench.store.client()
        with ClientProbe() as probe:
            started = time.perf_counter()
            keys = sum(len(page.get('Contents', ())) for page in
                       client.get_paginator('list_objects_v2').paginate(
                           Bucket=bench.store.bucket, Prefix=part.prefix + '/'))
            seconds = time.perf_counter() - started
        if keys != len(part.entries):
            bench.note(f'boto3: the listing has {keys} of {len(part.entries)} keys')
        _sample(bench, 'mount', system, rnd, seconds, probe)
        return
    if system.kind == 'local':
        mount = system.mount(part)
        _two_passes(bench, system, rnd, mount, part, _find, ('find_1', 'find_2'))
        _two_passes(bench, system, rnd, mount, part, _walk_stat, ('walk_1', 'walk_2'))
        return
    bench.drop()
    with bench.mount(system, part, fresh=True) as mount:
        _sample(bench, 'mount', system, rnd, mount.mount_seconds, since_start(mount))
    with bench.mount(system, part, fresh=False) as mount:
        _sample(bench, 'remount', system, rnd, mount.mount_seconds, since_start(mount))
        _two_passes(bench, system, rnd, mount, part, _find, ('find_1', 'find_2'))
    with bench.mount(system, part, fresh=False) as mount:
        _two_passes(bench, system, rnd, mount, part, _walk_stat, ('walk_1', 'walk_2'))


def _first_listing(mount):
    """List the root and its first folder (what `ls` and a look into one class folder do)."""
    names = sorted(os.listdir(mount.path))
    if names:
        os.listdir(os.path.join(mount.path, names[0]))


def metadata_objects(bench, system, rnd):
    """N empty objects named like ImageNet's (--metadata-objects): mount with an empty cache
    until the first `ls` answers, remount (cache kept) likewise, then `find` and walk + stat,
    twice each, after a remount (the report's usage table has the serving process's peak RSS
    since each mount: after the first listing, and after the walk). cachefs lists everything
    before it answers, s3fs and rclone list a folder when it is first read, so "to first `ls`"
    is the time until a user sees the root and one class folder. A peer figure that runs past
    --peer-timeout is stopped and shown as "> T s (stopped)"; cachefs is never stopped."""
    part = bench.parts['names']
    timeout = bench.options.peer_timeout if system.name != 'cachefs' else 24 * 3600
    if system.kind == 'local':
        return          # the names exist only in the store
    if system.kind == 'store':
        client = bench.store.client()
        with ClientProbe() as probe:
            started = time.perf_counter()
            keys = 0
            for page in client.get_paginator('list_objects_v2').paginate(
                    Bucket=bench.store.bucket, Prefix=part.prefix + '/'):
                keys += len(page.get('Contents', ()))
                if time.perf_counter() - started > timeout:
                    break
            seconds = time.perf_counter() - started
        if seconds > timeout:
            _stopped(bench, 'objects_first', system, rnd, timeout, probe)
            return
        if keys != len(part.entries):
            bench.note(f'boto3: the listing has {keys} of {len(part.entries)} keys')
        _sample(bench, 'objects_first', system, rnd, seconds, probe, keys=keys)
        return
    for row, fresh in (('objects_first', True), ('objects_remount', False)):
        bench.drop()
        started = time.monotonic()
        with bench.mount(system, part, fresh=fresh) as mount:
            _first_listing(mount)
            seconds = time.monotonic() - started
            probe = since_start(mount)
            _sample(bench, row, system, rnd, seconds, probe, mount_s=mount.mount_seconds)
    for rows, function in ((('objects_find_1', 'objects_find_2'), _find),
                           (('objects_walk_1', 'objects_walk_2'), _walk_stat)):
        with bench.mount(system, part, fresh=False) as mount:
            bench.drop()
            for row in rows:
                with Probe(mount) as probe:
                    try:
                        seconds = function(bench, system, mount, part, timeout)
                    except Stopped:
                        seconds = None
                if seconds is None:
                    _stopped(bench, row, system, rnd, timeout, probe)
                    break       # a 2nd pass after a stopped 1st would measure a partial cache
                _sample(bench, row, system, rnd, seconds, probe)


def _stopped(bench, row, system, rnd, timeout, probe):
    bench.note(f'{system.name}: {row} ran past --peer-timeout {timeout:g} s and was stopped')
    _sample(bench, row, system, rnd, timeout, probe, stopped=1)


def small_files(bench, system, rnd):
    """Small files read whole by 8 threads: first read (cold), then warm, dropped and kept."""
    part = bench.parts['small']
    threads = bench.options.threads
    if system.kind == 'store':
        bench.drop()
        jobs = [(f'{part.prefix}/{rel}', 0, None) for rel in bench.order(part, 'small_first', rnd)]
        with ClientProbe() as probe:
            total, seconds = store_read(bench, jobs)
        _sample(bench, 'small_first', system, rnd, len(jobs) / seconds, probe,
                mib_s=total / MiB / seconds)
        if rnd == 0:
            verify_store(bench, system, part)
        return
    with bench.mount(system, part) as mount:
        for row, drop in (('small_first', True), ('small_warm_dropped', True),
                          ('small_warm_kept', False)):
            paths = _full_paths(mount, bench.order(part, row, rnd))
            if drop:
                bench.drop()
            with Probe(mount) as probe:
                total, seconds = read_small_files(paths, threads)
            _check_bytes(bench, system, row, total, part)
            _sample(bench, row, system, rnd, len(paths) / seconds, probe,
                    mib_s=total / MiB / seconds)
        if rnd == 0:
            verify(bench, system, part, mount)


def oversubscription(bench, system, rnd):
    """cachefs only: the shards are 1.5x the SSD cache; 3 epochs per eviction policy."""
    if system.name != 'cachefs':
        return
    part = bench.parts['shards']
    cache_size = part.total_bytes * 2 // 3
    for policy in ('lru', 'none'):
        # Prefetch off: prefetched blocks stay in memory after they are read (up to
        # --prefetch-memory, 512M by default), which would make memory rather than the SSD tier
        # decide the hit ratio; and a small --prefetch-memory drops blocks before they are read
        # when readers x window exceed it, so they are fetched twice. Neither is what this
        # scenario is about: the SSD tier's policy, one store read per block not cached.
        options = dict(cache_size=cache_size, memory_cache_size=bench.options.oversub_memory,
                       prefetch_window=0, eviction=policy)
        with bench.mount(system, part, **options) as mount:
            for epoch in (1, 2, 3):
                paths = _full_paths(mount, bench.order(part, f'oversub{epoch}', rnd))
                bench.drop()
                with Probe(mount) as probe:
                    total, _, seconds = _epoch(bench, read_file, paths)
                _check_bytes(bench, system, f'oversubscription {policy}', total, part)
                stats = probe.stats
                lookups = stats.get('hits', 0) + stats.get('misses', 0)
                entry = dict(policy=policy, round=rnd, epoch=epoch, mib_s=total / MiB / seconds,
                             ssd_hit_ratio=stats.get('disk_hits', 0) / lookups if lookups else None,
                             hit_ratio=stats.get('hits', 0) / lookups if lookups else None,
                             # Lookups leave out reads that waited for a prefetch in flight; the
                             # bytes that did not come from the store are the plainer measure.
                             bytes_from_cache=max(0.0, 1 - stats.get('store_bytes', 0)
                                                  / part.total_bytes),
                             cpu_s=probe.cpu_s, peak_rss=probe.peak_rss,
                             cache_size=cache_size, **stats)
                after = mount.stats() or {}
                for key in ('memory_used_bytes', 'memory_capacity_bytes', 'disk_used_bytes',
                            'disk_capacity_bytes', 'prefetch_memory_used_bytes'):
                    entry[key] = after.get(key)
                bench.oversubscription.append(entry)
                log.info('oversubscription %s round %d epoch %d: %.0f MiB/s, SSD hit ratio %s, '
                         'store %.0f MiB, SSD writes %.0f MiB', policy, rnd + 1, epoch,
                         entry['mib_s'], entry['ssd_hit_ratio'],
                         stats.get('store_bytes', 0) / MiB, stats.get('disk_write_bytes', 0) / MiB)
            if rnd == 0:
                # Eviction is where a cache serves the wrong block: check after three epochs.
                named = _Named(f'cachefs --eviction {policy}, oversubscribed')
                verify(bench, named, part, mount)


def block_size_sweep(bench, system, rnd, block_size):
    """cachefs only: cold and warm (page cache dropped) epoch of the shards at one block size."""
    part = bench.parts['shards']
    entry = dict(block_size=block_size, round=rnd)
    with bench.mount(system, part, block_size=block_size) as mount:
        for phase in ('cold', 'warm'):
            paths = _full_paths(mount, bench.order(part, f'sweep-{phase}', rnd))
            bench.drop()
            with Probe(mount) as probe:
                total, _, seconds = _epoch(bench, read_file, paths)
            _check_bytes(bench, system, f'block size {block_size} {phase}', total, part)
            entry[f'{phase}_mib_s'] = total / MiB / seconds
            entry[f'{phase}_cpu_s'] = probe.cpu_s
            entry[f'{phase}_store_requests'] = probe.stats.get('store_requests')
            entry['peak_rss'] = probe.peak_rss
        if rnd == 0:
            # Block boundaries move with the block size: check the bytes at every size.
            verify(bench, _Named(f'cachefs --block-size {block_size}'), part, mount)
    bench.sweep.append(entry)
    log.info('block size %s round %d: cold %.0f MiB/s, warm %.0f MiB/s', block_size, rnd + 1,
             entry['cold_mib_s'], entry['warm_mib_s'])


class _Named:
    """A name to file verification results under, for one configuration of a system."""

    def __init__(self, name):
        self.name = name


#: name -> (function, datasets it reads)
SCENARIOS = {
    'epochs': (epochs, ('shards',)),
    'tfrecord': (tfrecord, ('shards',)),
    'metadata': (metadata, ('small',)),
    'small-files': (small_files, ('small',)),
    'oversubscription': (oversubscription, ('shards',)),
    'metadata-objects': (metadata_objects, ('names',)),
}
