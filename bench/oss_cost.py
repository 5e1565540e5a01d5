"""`python bench/oss_cost.py`: CPU and wall time of one ranged OSS GET, oss2's
`Bucket.get_object` (what `OssStore.read` calls in worker threads) against cachefs's lean path
on the trio thread (`cachefs.ufs.oss_trio`, what `OssStore.read_async` sends), in the same run,
against the OSS test server on loopback (a child process: its CPU is not counted).

The OSS twin of bench/get_cost.py: each round reads every object of the small-files dataset (or
the first --objects of them) once per path, alternating the order of the paths between rounds;
figures are medians over rounds. Only this process's CPU is measured.
"""

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, report  # noqa: E402
from bench.get_cost import sample  # noqa: E402
from bench.oss_store import BUCKET, OssStore  # noqa: E402

LABELS = (('oss2', 'oss2 `Bucket.get_object` (`OssStore.read`, worker threads)'),
          ('trio', 'cachefs lean path on the trio thread (`ufs/oss_trio.py`)'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench')
    parser.add_argument('--small-files', type=int, default=1000, help='dataset size (files)')
    parser.add_argument('--objects', type=int, default=500, help='objects read per round')
    parser.add_argument('--rounds', type=int, default=5)
    options = parser.parse_args(argv)
    host.install_exit_handlers()
    import trio
    from cachefs.ufs.oss import OssStore as CachefsOssStore

    store = OssStore(options.workdir)
    part = datasets.prepare(options.workdir, 'small', options.small_files)
    try:
        store.ensure(part)
        store.start()
        os.environ.update(store.env())
        oss = CachefsOssStore(BUCKET, part.prefix + '/', store.endpoint)
        if 'trio' not in oss.read_paths():
            raise SystemExit('the lean OSS path is off here (see the log); nothing to compare')
        objects = list(oss.list_objects())[:options.objects]

        def oss2_reads(chosen):
            return [oss.read(obj.key, obj.etag, 0, obj.size) for obj in chosen]

        def trio_reads(chosen):
            async def read_all():
                return [await oss.read_async(obj.key, obj.etag, 0, obj.size) for obj in chosen]
            return trio.run(read_all)

        paths = {'oss2': oss2_reads, 'trio': trio_reads}
        samples = sample(paths, objects, options.rounds)
    finally:
        store.stop()
        host.cleanup()

    cpu = {name: statistics.median(c for c, _ in samples[name]) for name in samples}
    wall = {name: statistics.median(w for _, w in samples[name]) for name in samples}
    rows = [[label, f'{cpu[name]:.2f}', f'{wall[name]:.2f}'] for name, label in LABELS]
    table = report.markdown_table(['OSS GET path', 'CPU ms per GET',
                                   'wall ms per GET (1 at a time)'], rows)
    load = os.getloadavg()[0]
    print('\n'.join([
        f"- command: `{' '.join(['python', 'bench/oss_cost.py', *(argv or sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f'- machine: {os.cpu_count()} cores, shared (1-minute load average {load:.1f} at the '
        'end); the store is the OSS test server (tests/support/oss_server.py) on loopback, '
        'in its own process', '', table, '',
        f"Less CPU per GET than oss2: trio {cpu['oss2'] / cpu['trio']:.1f}x. Objects: "
        f'{len(objects)} files of {part.describe()}, read whole with Range, If-Match and '
        f'x-oss-range-behavior, one at a time; medians of {options.rounds} rounds.']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
