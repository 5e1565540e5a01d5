"""`python bench/oss_epochs.py`: cold and warm epochs of a cachefs mount over the OSS test
server, next to raw oss2 parallel ranged reads of the same files, in the same run.

Datasets: ImageNet-style small files (each read whole) and TFRecord shards (read in 8 MiB
ranges), from bench/datasets.py. Each epoch reads every range of a dataset once with --threads
threads, in a shuffled order that is the same for every system of a round:
- `oss2`: no file system, `Bucket.get_object` with a byte range per task (one Bucket, its
  connection pool as large as the threads); the upper bound of the store through oss2;
- `cachefs cold`: a new mount with an empty cache (its first epoch: every byte from the store,
  through the lean OSS path where it applies);
- `cachefs warm`: the same mount's second epoch, page cache dropped first (when root), so the
  bytes come from cachefs's own cache.
After each drop the server's object files are read back into the page cache (unless
--store-from-disk): this machine's disk is not a store's, and a cold epoch that waits on it
measures the disk's seeks under 32 parallel requests, not the client.
The OSS test server is pure Python and runs on the same cores as the client: what compares is
the ratio of cachefs to oss2 through the same server, not MiB/s (nor MiB/s against the SeaweedFS
figures). CPU columns, per epoch: the client's (the cachefs daemon; for oss2 this process, its
reader threads) and the server's. Content is checked (sha256 of every file)
through the mount after the first round's warm epoch, outside the timed reads.
"""

import argparse
import datetime
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, report, workers  # noqa: E402
from bench.oss_store import BUCKET, OssStore  # noqa: E402

RANGE = 8 << 20
MiB = 1 << 20


def tasks_of(part):
    """(relative path, offset, length) of every read of one epoch."""
    tasks = []
    for rel, size, _ in part.entries:
        step = size if part.kind == 'small' else RANGE
        tasks += [(rel, offset, min(step, size - offset)) for offset in range(0, size, step)]
    return tasks


def cpu_of(pid):
    return host.cpu_seconds(pid) or 0.0


class Mount:
    def __init__(self, store, part, workdir):
        self.path = Path(tempfile.mkdtemp(prefix='mnt-', dir=workdir))
        self.cache = Path(tempfile.mkdtemp(prefix='cache-', dir=workdir))
        command = [sys.executable, '-m', 'cachefs', 'mount', f'oss://{BUCKET}/{part.prefix}',
                   self.path, '--endpoint-url', store.endpoint, '--cache-dir', self.cache,
                   '--log-file', Path(workdir) / 'cachefs-oss.log']
        self._token = host.on_cleanup(f'cachefs mount {self.path}', self.close)
        result = subprocess.run(list(map(str, command)), env=dict(os.environ, **store.env()),
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f'cachefs mount failed: {result.stderr.strip()}')
        from cachefs import control
        self.pid = control.open_mount(self.path).daemon_pid()

    def close(self):
        if host.is_mounted(self.path):
            subprocess.run([sys.executable, '-m', 'cachefs', 'umount', str(self.path)],
                           timeout=60, check=False)
            host.unmount(self.path)
        host.rmtree(self.cache)
        host.rmtree(self.path)
        host.done(self._token)


def mount_epoch(root, tasks, threads):
    def one(task):
        rel, offset, length = task
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise RuntimeError(f'{rel}: {len(data)} bytes of {length} at {offset}')
        return length
    return sum(workers.map_threads(one, tasks, threads))


def oss2_epoch(bucket, prefix, tasks, threads):
    def one(task):
        rel, offset, length = task
        data = bucket.get_object(f'{prefix}/{rel}',
                                 byte_range=(offset, offset + length - 1)).read()
        if len(data) != length:
            raise RuntimeError(f'{rel}: {len(data)} bytes of {length} at {offset}')
        return length
    return sum(workers.map_threads(one, tasks, threads))


def warm_store(store):
    """Read the server's object files into the page cache (what `--store-from-disk` skips)."""
    for path in (store.root / BUCKET / 'objects').glob('*.data'):
        with open(path, 'rb', buffering=0) as f:
            while f.read(8 << 20):
                pass


def timed(function, pids, store=None):
    """(bytes, seconds, [CPU seconds of each of `pids`]) of one epoch; page cache dropped
    first, then the store's files read back in unless `store` is None."""
    host.drop_page_cache()
    if store is not None:
        warm_store(store)
    cpu = [cpu_of(pid) for pid in pids]
    started = time.perf_counter()
    count = function()
    seconds = time.perf_counter() - started
    return count, seconds, [cpu_of(pid) - before for pid, before in zip(pids, cpu)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench')
    parser.add_argument('--small-files', type=int, default=1500)
    parser.add_argument('--shards', type=int, default=4)
    parser.add_argument('--shard-size', type=int, default=32 * MiB)
    parser.add_argument('--threads', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--store-from-disk', action='store_true',
                        help="leave the server's files out of the page cache too (by default "
                        'they are read back in after each drop: the store answers from memory, '
                        "as a real store's disks are not this machine's)")
    options = parser.parse_args(argv)
    host.install_exit_handlers()
    import oss2
    import oss2.defaults

    store = OssStore(options.workdir)
    in_memory = None if options.store_from_disk else store
    parts = [datasets.prepare(options.workdir, 'small', options.small_files),
             datasets.prepare(options.workdir, 'shards', options.shards,
                              shard_size=options.shard_size)]
    results = {}        # (part key, system) -> [(MiB/s, files/s, client CPU s, server CPU s)]
    try:
        for part in parts:
            store.ensure(part)
        store.start()
        oss2.defaults.connection_pool_size = max(oss2.defaults.connection_pool_size,
                                                 options.threads)
        bucket = oss2.Bucket(oss2.Auth(*store.env().values()), store.endpoint, BUCKET,
                             enable_crc=False)
        for round_ in range(options.rounds):
            for part in parts:
                tasks = tasks_of(part)
                random.Random(round_).shuffle(tasks)
                files = len(part.entries)

                def record(system, outcome):
                    count, seconds, (server, client) = outcome
                    results.setdefault((part.key, system), []).append(
                        (count / MiB / seconds, files / seconds, client, server))
                # the client of the oss2 reads is this process
                record('oss2', timed(lambda: oss2_epoch(bucket, part.prefix, tasks,
                                                        options.threads),
                                     [store.pid(), os.getpid()], in_memory))
                mount = Mount(store, part, options.workdir)
                try:
                    pids = [store.pid(), mount.pid]
                    for system in ('cachefs cold', 'cachefs warm'):
                        record(system, timed(lambda: mount_epoch(mount.path, tasks,
                                                                 options.threads), pids,
                                             in_memory))
                    if round_ == 0:
                        host.drop_page_cache()
                        problems = workers.verify_tree(mount.path, part.entries)
                        if problems:
                            raise SystemExit('content check failed: ' + '; '.join(problems[:5]))
                finally:
                    mount.close()
    finally:
        store.stop()
        host.cleanup()

    rows = []
    for part in parts:
        base = statistics.median(r[0] for r in results[(part.key, 'oss2')])
        for system in ('oss2', 'cachefs cold', 'cachefs warm'):
            samples = results[(part.key, system)]
            mib = statistics.median(r[0] for r in samples)
            rows.append([part.describe(), system, f'{mib:.0f}',
                         ' / '.join(f'{r[0]:.0f}' for r in samples),
                         f'{statistics.median(r[1] for r in samples):.0f}',
                         f'{mib / base:.2f}', f'{statistics.median(r[2] for r in samples):.2f}',
                         f'{statistics.median(r[3] for r in samples):.2f}'])
    table = report.markdown_table(['dataset', 'system', 'MiB/s', 'MiB/s by round', 'files/s',
                                   'x oss2',
                                   'client CPU s', 'server CPU s'], rows)
    load = os.getloadavg()[0]
    print('\n'.join([
        f"- command: `{' '.join(['python', 'bench/oss_epochs.py', *(argv or sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f'- machine: {os.cpu_count()} cores, shared (1-minute load average {load:.1f} at the '
        f'end); page cache dropped before each epoch: {host.can_drop_page_cache()}, the store\'s '
        f'files then read back in: {in_memory is not None}; the store is the OSS test server '
        'on loopback in its own process', '', table, '',
        f'Medians of {options.rounds} rounds, {options.threads} reader threads; small files read '
        f'whole, shards in 8 MiB ranges; content checked through the mount (sha256).']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
