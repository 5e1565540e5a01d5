"""`python bench/run.py`: benchmark cachefs against local disk, raw boto3, s3fs and rclone.

One command: starts SeaweedFS on loopback, generates the seeded datasets once (kept under
--workdir and reused while the parameters stay the same), runs every selected scenario for every
selected system, round after round, and prints a table of medians and ratios. The same figures go
to bench/results/latest.json (and --json-out); --write-results also writes bench/RESULTS.md and
draws its plots (bench/plots/*.png, plots.py).
See bench/README.md for what each figure means.

Everything started here (server, mounts, daemons, reader processes) is stopped and unmounted at
the end, also after an error, Ctrl-C or SIGTERM (see host.py).
"""

import argparse
import datetime
import fcntl
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# Run as a script, bench/ itself is on sys.path; the package needs its parent.
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, plots, report, scenarios, systems  # noqa: E402
from bench.store import Store  # noqa: E402

log = logging.getLogger('bench')

MiB = 1 << 20
DEFAULTS = dict(shards=24, shard_size='64M', small_files=20000, metadata_objects=20000, rounds=3)
QUICK = dict(shards=8, shard_size='16M', small_files=1000, metadata_objects=2000, rounds=1)
RESULTS_MD = BENCH_DIR / 'RESULTS.md'
LATEST_JSON = BENCH_DIR / 'results' / 'latest.json'


class UsageError(Exception):
    """A mistake on the command line or in the environment: one line, exit status 2."""


def parse_size(text):
    match = re.fullmatch(r'(\d+)([KMG]?)i?B?', text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size like 4M or 512K')
    return int(match.group(1)) << {'': 0, 'K': 10, 'M': 20, 'G': 30}[match.group(2).upper()]


def csv_list(choices):
    def parse(text):
        items = [item.strip() for item in text.split(',') if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f'unknown {", ".join(unknown)}; choose from '
                                             f'{", ".join(choices)}')
        return items
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog='bench/run.py', description=__doc__.split('\n\n')[0].split(': ', 1)[1])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench',
                        help='datasets, store data, caches, mounts and logs live here '
                        '(default /var/tmp/cachefs-bench)')
    parser.add_argument('--only', type=csv_list(systems.ORDER), default=list(systems.ORDER),
                        help=f'systems to run, comma-separated (default {",".join(systems.ORDER)})')
    parser.add_argument('--scenarios', type=csv_list(tuple(scenarios.SCENARIOS)),
                        default=list(scenarios.SCENARIOS),
                        help=f'scenarios to run, comma-separated (default '
                        f'{",".join(scenarios.SCENARIOS)})')
    parser.add_argument('--shards', type=int, default=None,
                        help=f"TFRecord shards (default {DEFAULTS['shards']}, "
                        f"quick {QUICK['shards']})")
    parser.add_argument('--shard-size', type=parse_size, default=None,
                        help=f"bytes per shard (default {DEFAULTS['shard_size']}, "
                        f"quick {QUICK['shard_size']})")
    parser.add_argument('--small-files', type=int, default=None,
                        help=f"small files, 90-130 KiB each in 100 folders (default "
                        f"{DEFAULTS['small_files']}, quick {QUICK['small_files']})")
    parser.add_argument('--metadata-objects', type=int, default=None,
                        help=f"empty objects named like ImageNet's in 1,000 folders, for the "
                        f"metadata-objects scenario (default {DEFAULTS['metadata_objects']:,}, "
                        f"quick {QUICK['metadata_objects']:,}; ImageNet has 1,281,167)")
    parser.add_argument('--peer-timeout', type=float, default=600,
                        help='metadata-objects: a peer figure that takes longer is stopped and '
                        'reported as "> T s (stopped)" (default 600)')
    parser.add_argument('--prepare-only', action='store_true',
                        help='generate and upload the datasets of the chosen scenarios, then stop')
    parser.add_argument('--upload-lock', default=None, metavar='FILE',
                        help='hold this flock while uploading the metadata objects, 50 folders '
                        'at a time (so that other timed runs can take turns)')
    parser.add_argument('--rounds', type=int, default=None,
                        help=f"rounds per figure; figures are medians (default "
                        f"{DEFAULTS['rounds']}, quick {QUICK['rounds']})")
    parser.add_argument('--quick', action='store_true',
                        help='small datasets and 1 round: about 2 minutes')
    parser.add_argument('--seed', type=int, default=0, help='dataset and shuffle seed (default 0)')
    parser.add_argument('--readers', type=int, default=4,
                        help='reader processes per epoch (default 4)')
    parser.add_argument('--threads', type=int, default=8,
                        help='threads reading small files (default 8)')
    parser.add_argument('--oversub-memory', type=parse_size, default=None,
                        help='cachefs --memory-cache-size in the oversubscription scenario '
                        '(default: 1/16 of the shards, 8M to 64M)')
    parser.add_argument('--block-size-sweep', type=lambda t: [s.strip() for s in t.split(',')],
                        default=None, metavar='1M,2M,4M,8M,16M',
                        help='instead of the scenarios: cold + warm shard epochs of cachefs at '
                        'each block size')
    parser.add_argument('--json-out', default=None,
                        help=f'also write the JSON here (always written to {LATEST_JSON})')
    parser.add_argument('--write-results', action='store_true',
                        help=f'write {RESULTS_MD} from this run')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    return parser


def resolve(options):
    """Fill sizes from --quick or the defaults, and check them."""
    preset = QUICK if options.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(options, name) is None:
            setattr(options, name, parse_size(value) if name == 'shard_size' else value)
    if min(options.shards, options.small_files, options.metadata_objects, options.rounds,
           options.readers, options.threads) < 1:
        raise UsageError('--shards, --small-files, --metadata-objects, --rounds, --readers and '
                         '--threads must be >= 1')
    if options.shard_size < 1 * MiB:
        raise UsageError('--shard-size must be at least 1M')
    if options.write_results and not plots.available():
        # Found out now rather than after an hour of measuring.
        raise UsageError("--write-results draws plots with matplotlib, which is missing: "
                         "pip install -e '.[bench]' (scripts/dev.sh bench installs it)")
    if options.oversub_memory is None:
        # Small next to the data, so that the SSD tier (not memory) decides the hit ratio.
        total = options.shards * options.shard_size
        options.oversub_memory = max(8 * MiB, min(64 * MiB, total // 16 // MiB * MiB))
    return options


def machine_facts():
    with open('/proc/meminfo') as f:
        total_kib = int(f.readline().split()[1])
    return dict(cpus=os.cpu_count(), memory_gib=total_kib / (1 << 20),
                kernel=platform.release(), python=platform.python_version(),
                hostname=platform.node())


def weed_version():
    try:
        from cachefs.demo.seaweed import find_weed
        out = subprocess.run([find_weed(), 'version'], capture_output=True, text=True,
                             timeout=30).stdout
        first = out.strip().splitlines()[0] if out.strip() else ''
        return 'weed ' + first.replace('version ', '')
    except (OSError, subprocess.SubprocessError):
        return 'weed'


#: What an error line looks like in each daemon's log (s3fs logs its start-up at [CRT]).
LOG_ERRORS = {
    'cachefs': (re.compile(r' (ERROR|CRITICAL) |Traceback'), None),
    's3fs': (re.compile(r'\[(ERR|CRT)\]'), re.compile(r'change debug level')),
    'rclone': (re.compile(r'\bERROR\b|panic:'), None),
}


def scan_daemon_logs(bench, rundir):
    """Surface errors that the daemons logged during the run (a bug, or a store problem)."""
    for name, (pattern, harmless) in LOG_ERRORS.items():
        path = rundir / 'logs' / f'{name}.log'
        if not path.exists():
            continue
        bad = [line.rstrip() for line in path.open(errors='replace')
               if pattern.search(line) and not (harmless and harmless.search(line))]
        if bad:
            bench.note(f'{name} logged {len(bad)} error line(s), first: {bad[0][:300]} '
                       f'(log: {path})')


def run_scenarios(bench, runnable, names, rounds):
    """Every scenario, round after round, every system once per round."""
    failed = set()
    for name in names:
        function, _ = scenarios.SCENARIOS[name]
        for rnd in range(rounds):
            for system in runnable:
                host.check_stop()
                if (name, system.name) in failed:
                    continue
                log.info('== %s, %s, round %d of %d', name, system.name, rnd + 1, rounds)
                try:
                    function(bench, system, rnd)
                except Exception as exc:
                    # One failing system must not cost the others their figures.
                    log.exception('%s failed in %s', system.name, name)
                    bench.note(f'{system.name}: {name} failed in round {rnd + 1} and was not '
                               f'run again: {type(exc).__name__}: {exc}')
                    failed.add((name, system.name))


def sweep_block_sizes(bench, cachefs, block_sizes, rounds):
    for rnd in range(rounds):
        for block_size in block_sizes:
            host.check_stop()
            try:
                scenarios.block_size_sweep(bench, cachefs, rnd, block_size)
            except Exception as exc:
                log.exception('block size %s failed', block_size)
                bench.note(f'block size {block_size}, round {rnd + 1} failed: {exc}')


def run(options, argv):
    workdir = Path(options.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / '.lock', 'w')
    try:
        # Two runs on one workdir would remove each other's caches and share one store folder.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f'another run is using {workdir}; wait for it or pass another '
                         '--workdir') from None
    rundir = workdir / 'run'
    try:
        return _run_locked(options, argv, workdir, rundir)
    finally:
        host.cleanup()
        host.rmtree(rundir / 'cache')   # GiBs of blocks; logs and mount points stay


def _run_locked(options, argv, workdir, rundir):
    busy = host.mounts_under(rundir)
    if busy:
        raise UsageError(f'{", ".join(busy)} is still mounted (another run?); unmount it first')
    host.rmtree(rundir)
    rundir.mkdir()
    started = time.monotonic()
    load_at_start = os.getloadavg()

    sweep = options.block_size_sweep
    chosen = ['cachefs'] if sweep else [n for n in systems.ORDER if n in options.only]
    scenario_names = [] if sweep else options.scenarios
    store = Store(workdir)
    skipped, runnable = {}, []
    for name in chosen:
        system = systems.ALL[name](store, rundir)
        why = system.unavailable()
        if why:
            skipped[name] = why
            log.warning('skipping %s: %s', name, why)
        else:
            runnable.append(system)
    if sweep and not runnable:
        raise UsageError(f'the block-size sweep needs cachefs: {skipped["cachefs"]}')

    kinds = {'shards'} if sweep else {k for s in scenario_names for k in scenarios.SCENARIOS[s][1]}
    parts = {}
    if 'shards' in kinds:
        parts['shards'] = datasets.prepare(workdir, 'shards', options.shards,
                                           options.shard_size, options.seed)
    if 'small' in kinds:
        parts['small'] = datasets.prepare(workdir, 'small', options.small_files, seed=options.seed)
    if 'names' in kinds:
        parts['names'] = datasets.prepare_names(options.metadata_objects)
    store.start()
    for part in parts.values():
        if part.kind == 'names':
            datasets.upload_names(store, part, lock_path=options.upload_lock)
        else:
            store.ensure(part)
    if options.prepare_only:
        store.stop()
        log.info('datasets ready: %s', ', '.join(p.describe() for p in parts.values()))
        return 0

    bench = scenarios.Bench(options, store, parts, rundir)
    if sweep:
        sweep_block_sizes(bench, runnable[0], sweep, options.rounds)
    else:
        run_scenarios(bench, runnable, scenario_names, options.rounds)
        try:
            scenarios.verify_missing(bench, runnable, sorted(kinds))
        except Exception as exc:
            log.exception('verification failed')
            bench.note(f'verification failed: {type(exc).__name__}: {exc}')
    scan_daemon_logs(bench, rundir)
    store.stop()

    meta = dict(
        command=' '.join(['python', 'bench/run.py'] + list(argv)),
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        rounds=options.rounds, readers=options.readers, threads=options.threads,
        oversub_memory=options.oversub_memory, seed=options.seed,
        datasets={kind: part.describe() for kind, part in parts.items()},
        versions={s.name: s.version() for s in runnable if s.version()},
        duration_s=time.monotonic() - started, **machine_facts(),
        # Other people's tests share these 2 cores: the load says how much.
        load_average=dict(start=load_at_start, end=os.getloadavg()))
    meta['versions']['store'] = weed_version()
    reduced = []
    if 'shards' in parts and (options.shards, options.shard_size) != (24, 64 * MiB):
        reduced.append(f'{options.shards} shards of {options.shard_size / MiB:g} MiB instead of '
                       f'24 x 64 MiB')
    if 'small' in parts and options.small_files != 20000:
        reduced.append(f'{options.small_files:,} small files instead of 20,000')
    if 'names' in parts:
        meta['metadata_objects'] = options.metadata_objects
    if options.rounds < 3:
        reduced.append(f'{options.rounds} round(s) instead of 3')
    meta['reduced'] = '; '.join(reduced)
    result = dict(
        meta=meta, systems_run=[s.name for s in runnable], skipped=skipped,
        figures=report.aggregate(bench.samples), oversubscription=bench.oversubscription,
        block_size_sweep=bench.sweep, verification_raw=bench.verified, notes=bench.notes,
        commands={s.name: s.commands for s in runnable if s.commands})
    text = report.render(result)
    print(text)
    data = report.to_json(result)
    for path in [LATEST_JSON] + ([Path(options.json_out)] if options.json_out else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
        log.info('wrote %s', path)
    if options.write_results:
        section = 'block-size-sweep' if sweep else 'scenarios'
        images = plots.draw(result, section, RESULTS_MD.parent / 'plots')
        block = report.plots_block(images, plots.FROM_RUN) if images else ''
        report.write_results(RESULTS_MD, section, report.results_section(result, text, block))
        log.info('wrote %s and %d plot(s) in %s', RESULTS_MD, len(images),
                 RESULTS_MD.parent / 'plots')
    mismatch = any(problems for problems in bench.verified.values())
    return 1 if mismatch else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', stream=sys.stderr)
    for noisy in ('botocore', 'boto3', 'urllib3', 's3transfer'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    host.install_exit_handlers()
    try:
        return run(resolve(options), argv)
    except UsageError as exc:
        print(f'bench/run.py: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        host.cleanup()


if __name__ == '__main__':
    sys.exit(main())
