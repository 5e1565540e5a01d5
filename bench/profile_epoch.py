"""`python bench/profile_epoch.py SCENARIO [--perf | --py-spy]`: one cachefs epoch under a profiler.

Where a speed target is missed, this shows why: it mounts cachefs on a bench dataset (the same
store, datasets and readers as bench/run.py), runs one scenario and prints, for the daemon, its
throughput, user and system CPU seconds, minor page faults and FUSE requests per operation. With
`--perf` it records `perf record -g` of the daemon during the measured epoch and prints the
kernel and native symbols that cost most, with their callers; with `--py-spy`, the Python
functions (self and inclusive). Numbers from a profiled run are slower than unprofiled ones.

Scenarios: `cold` (shards, empty cache, page cache dropped), `warm` (shards, one cold epoch
first, then the measured epoch with the page cache dropped), `small-first`, `small-warm` (the
small files, 8 threads), `walk` (os.walk + stat of the small files, twice after a remount, the
second measured).
"""

import argparse
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, systems, workers  # noqa: E402
from bench.store import Store  # noqa: E402

SCENARIOS = ('cold', 'warm', 'small-first', 'small-warm', 'walk')


def daemon_counters(mount):
    """(user s, system s, minor faults, {FUSE op: count}) of the cachefs daemon so far."""
    user, system, faults = host.process_times(mount.pid)
    ops = {name: op['count'] for name, op in mount.stats()['fuse_ops'].items()}
    return user, system, faults, ops


def run_epoch(scenario, mount, part, options):
    """One pass; returns a line with its rate."""
    paths = [os.path.join(mount.path, p) for p in part.paths]
    random.Random(options.seed).shuffle(paths)
    host.drop_page_cache()
    started = time.perf_counter()
    if scenario.startswith('small'):
        _, seconds = workers.read_small_files(paths, options.threads)
        return f'{len(paths) / seconds:,.0f} files/s'
    if scenario == 'walk':
        for root, _, files in os.walk(mount.path):
            for name in files:
                os.stat(os.path.join(root, name))
        return f'{time.perf_counter() - started:.3f} s'
    total, _, seconds = workers.read_in_processes(workers.read_file, paths, options.readers)
    return f'{total / seconds / 2**20:,.0f} MiB/s'


def start_profiler(program, pid, out):
    if os.path.basename(program) == 'perf':
        return subprocess.Popen([program, 'record', '-F', '999', '-g', '-p', str(pid), '-o',
                                 str(out / 'perf.data')], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.Popen([program, 'record', '-p', str(pid), '-r', '200', '-f', 'raw',
                             '--nonblocking', '-o', str(out / 'py-spy.txt')],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def print_perf(out, top):
    report = subprocess.run(
        ['perf', 'report', '-i', str(out / 'perf.data'), '--no-children', '--sort', 'sym',
         '--stdio', '-g', 'caller,0.5,callee,function,percent', '--percent-limit', str(top)],
        capture_output=True, text=True)
    # Unresolved frames of the Python interpreter are only addresses: leave them out.
    for line in report.stdout.splitlines():
        if line.startswith('#') or not line.strip(' |') or re.search(r'0x[0-9a-f]+\s*$', line):
            continue
        print(line)


def print_py_spy(out, top):
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in (out / 'py-spy.txt').read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        frames, count = stack.split(';'), int(count)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    for title, counter in (('self', own), ('inclusive', inclusive)):
        print(f'-- py-spy, {title} (share of {total} samples, idle threads excluded)')
        for frame, count in counter.most_common(25):
            if count / total * 100 >= top:
                print(f'{count / total * 100:5.1f}%  {frame}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('scenario', choices=SCENARIOS)
    profiler = parser.add_mutually_exclusive_group()
    profiler.add_argument('--perf', action='store_const', dest='profiler', const='perf')
    profiler.add_argument('--py-spy', action='store_const', dest='profiler', const='py-spy')
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench')
    parser.add_argument('--shards', type=int, default=24)
    parser.add_argument('--shard-size', type=int, default=64 << 20)
    parser.add_argument('--small-files', type=int, default=5000)
    parser.add_argument('--readers', type=int, default=4)
    parser.add_argument('--threads', type=int, default=8)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--top', type=float, default=2.0, help='smallest share shown, percent')
    # Extra cachefs options come after `--` (argparse's nargs='*' after a positional loses
    # them: "unrecognized arguments")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index('--') if '--' in argv else len(argv)
    options = parser.parse_args(argv[:cut])
    options.mount_options = argv[cut + 1:]
    if options.profiler:
        # py-spy usually lives in the venv next to this Python, perf in the system
        search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
        options.profiler_path = shutil.which(options.profiler, path=search)
        if not options.profiler_path:
            parser.error(f'{options.profiler} is not installed')
    host.install_exit_handlers()

    workdir = Path(options.workdir)
    rundir = workdir / 'profile'
    host.rmtree(rundir)
    rundir.mkdir(parents=True)
    if options.scenario in ('cold', 'warm'):
        part = datasets.prepare(workdir, 'shards', options.shards, options.shard_size,
                                options.seed)
    else:
        part = datasets.prepare(workdir, 'small', options.small_files, seed=options.seed)
    store = Store(workdir)
    try:
        store.start()
        store.ensure(part)
        cachefs = systems.CacheFS(store, rundir)
        extra = dict(zip(options.mount_options[::2], options.mount_options[1::2]))
        mount = cachefs.mount(part, str(rundir / 'cache'),
                              **{k.lstrip('-').replace('-', '_'): v for k, v in extra.items()})
        with mount:
            if options.scenario == 'warm' or options.scenario == 'small-warm':
                print('unmeasured first epoch:', run_epoch(options.scenario, mount, part, options))
            if options.scenario == 'walk':
                print('unmeasured first walk:', run_epoch('walk', mount, part, options))
            before = daemon_counters(mount)
            profiler = (start_profiler(options.profiler_path, mount.pid, rundir)
                        if options.profiler else None)
            time.sleep(1 if profiler else 0)
            rate = run_epoch(options.scenario, mount, part, options)
            if profiler:
                stop_profiler(profiler)
            after = daemon_counters(mount)
        ops = {name: count - before[3].get(name, 0) for name, count in after[3].items()}
        print(f'{options.scenario} ({part.describe()}): {rate}; daemon CPU user '
              f'{after[0] - before[0]:.2f} s, system {after[1] - before[1]:.2f} s, minor faults '
              f'{after[2] - before[2]:,}; FUSE requests '
              + ', '.join(f'{name} {count:,}' for name, count in sorted(ops.items()) if count))
        if options.profiler == 'perf':
            print_perf(rundir, options.top)
        elif options.profiler == 'py-spy':
            print_py_spy(rundir, options.top)
    finally:
        host.cleanup()      # unmounts, stops the daemon and the store, also after an error
    return 0


if __name__ == '__main__':
    sys.exit(main())
