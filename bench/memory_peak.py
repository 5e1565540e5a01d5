"""`python bench/memory_peak.py [-- OPTIONS]`: the daemon's peak memory beside its formula.

Mounts cachefs on the bench's shards (the same store and datasets as bench/run.py), runs a cold
epoch with many reader processes, then a second epoch with the page cache dropped, and prints
the memory formula's terms (src/cachefs/memory_budget.py, README "Memory") for the mount's
options next to the daemon's measured peak resident set (VmHWM of /proc/PID/status) and its
resident set at the end (VmRSS). The formula is a bound: the peak should stay under it. The
total the daemon itself computes (`memory_budget_bytes` in `cachefs stats`) is printed too, as
a check that this script adds the same terms.

The dataset should be at least as large as the memory tier plus the prefetch memory, so that
both fill (the defaults: 24 x 64 MiB shards against 1 GiB + 512 MiB); pass smaller
`--memory-cache-size` / `--prefetch-memory` after `--` to see eviction and buffer recycling at
work.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, systems, workers  # noqa: E402
from bench.store import Store  # noqa: E402
from cachefs import memory_budget  # noqa: E402
from cachefs import config  # noqa: E402
from cachefs.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20


def mount_namespace(mount_options):
    """The mount's options as the formula reads them, parsed as `cachefs mount` parses them."""
    parser = argparse.ArgumentParser()
    config.add_mount_options(parser)
    return parser.parse_args(mount_options)


def status_kib(pid, field):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def epoch(mount, part, readers, seed):
    paths = [os.path.join(mount.path, p) for p in part.paths]
    random.Random(seed).shuffle(paths)
    host.drop_page_cache()
    total, _, seconds = workers.read_in_processes(workers.read_file, paths, readers)
    return total / seconds / MiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench')
    parser.add_argument('--shards', type=int, default=24)
    parser.add_argument('--shard-size', type=parse_size, default=64 * MiB)
    parser.add_argument('--readers', type=int, default=16)
    parser.add_argument('--seed', type=int, default=0)
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index('--') if '--' in argv else len(argv)
    options = parser.parse_args(argv[:cut])
    options.mount_options = argv[cut + 1:]     # extra cachefs options, after --
    host.install_exit_handlers()
    extra = dict(zip(options.mount_options[::2], options.mount_options[1::2]))

    workdir = Path(options.workdir)
    rundir = workdir / 'memory-peak'
    host.rmtree(rundir)
    rundir.mkdir(parents=True)
    part = datasets.prepare(workdir, 'shards', options.shards, options.shard_size, options.seed)
    store = Store(workdir)
    try:
        store.start()
        store.ensure(part)
        cachefs = systems.CacheFS(store, rundir)
        mount = cachefs.mount(part, str(rundir / 'cache'),
                              **{k.lstrip('-').replace('-', '_'): v for k, v in extra.items()})
        with mount:
            start_kib = status_kib(mount.pid, 'VmRSS')
            rates = [epoch(mount, part, options.readers, options.seed + n) for n in range(2)]
            time.sleep(1.5)     # idle: the blocks held in memory go to the SSD tier
            peak_kib = status_kib(mount.pid, 'VmHWM')
            end_kib = status_kib(mount.pid, 'VmRSS')
            stats = mount.stats()
        namespace = mount_namespace(options.mount_options)
        ssd_tier = memory_budget.ssd_tier_requested(namespace)
        formula = memory_budget.formula_of(namespace, len(part.paths), ssd_tier)
    finally:
        host.cleanup()
    print(f'memory_peak: cachefs on {part.describe()}, {options.readers} reader processes, '
          f'options {" ".join(options.mount_options) or "(defaults)"}; cold epoch '
          f'{rates[0]:,.0f} MiB/s, second epoch (page cache dropped) {rates[1]:,.0f} MiB/s')
    rows = [('memory tier (--memory-cache-size)', formula.memory_cache),
            ('prefetch (--prefetch-memory)', formula.prefetch),
            ('SSD write queue (8 blocks)', formula.write_queue),
            ('store requests (--store-concurrency x --block-size)', formula.store_requests),
            ('FUSE reads (--max-idle-threads x 1 MiB)', formula.fuse_reads),
            ('tree (files x TREE_BYTES_PER_FILE)', formula.tree),
            ('interpreter and libraries', formula.base),
            *([('cluster fills (--cluster-fill-queue + 4 blocks)', formula.cluster_fills)]
              if formula.cluster_fills else []),
            ('formula total', formula.total),
            ("formula total as the daemon computes it (stats)", stats['memory_budget_bytes'])]
    measured = [('daemon RSS after mount', start_kib * 1024),
                ('daemon peak RSS (VmHWM)', peak_kib * 1024),
                ('daemon RSS at the end (VmRSS)', end_kib * 1024),
                ('memory tier in use at the end', stats.get('memory_used_bytes', 0))]
    width = max(len(name) for name, _ in rows + measured)
    print(f'| {"term":<{width}} | {"bytes":>14} | {"MiB":>8} |')
    print(f'|{"-" * (width + 2)}|{"-" * 16}|{"-" * 10}|')
    for name, value in rows + measured:
        print(f'| {name:<{width}} | {value:>14,} | {value / MiB:>8,.1f} |')
    share = peak_kib * 1024 / formula.total
    print(f'peak RSS / formula: {share:.0%} ({format_size(peak_kib * 1024)} of '
          f'{format_size(formula.total)})')
    return 0 if peak_kib * 1024 <= formula.total else 1


if __name__ == '__main__':
    sys.exit(main())
