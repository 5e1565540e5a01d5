"""`python bench/get_cost.py`: CPU and wall time of one ranged GET, botocore's `get_object`
against the lean paths cachefs reads objects with (`cachefs.ufs.s3_get` in worker threads,
`cachefs.ufs.s3_trio` on the trio thread), in the same run.

Why it matters: a first epoch over small files is one GET per file, made by the daemon's Python
threads, so the CPU of one GET bounds files/s on a small machine. Each round reads every object
of the small-files dataset (or the first --objects of them) once per path, alternating the order
of the paths between rounds; figures are medians over rounds.
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import datasets, host, report  # noqa: E402
from bench.store import Store  # noqa: E402


def measure(read_all, objects):
    """(CPU ms per GET of this process, wall ms per GET) for reading every object once."""
    cpu, wall = time.process_time(), time.perf_counter()
    for obj, data in zip(objects, read_all(objects)):
        if len(data) != obj.size:
            raise SystemExit(f'{obj.key}: short read')
    count = len(objects)
    return (time.process_time() - cpu) * 1e3 / count, (time.perf_counter() - wall) * 1e3 / count


def sample(paths, objects, rounds):
    """{path name: [(CPU ms, wall ms) per GET, one per round]}: every path reads `objects`
    once per round, the paths in turn (in reverse order every other round), after one warm-up
    read of 50 objects each (the connection pools)."""
    for read_all in paths.values():
        measure(read_all, objects[:50])
    samples = {name: [] for name in paths}
    for round_ in range(rounds):
        order = list(paths.items())
        for name, read_all in order if round_ % 2 == 0 else reversed(order):
            samples[name].append(measure(read_all, objects))
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-bench')
    parser.add_argument('--small-files', type=int, default=1000, help='dataset size (files)')
    parser.add_argument('--objects', type=int, default=500, help='objects read per round')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--write-results', action='store_true')
    options = parser.parse_args(argv)
    host.install_exit_handlers()
    import trio
    from cachefs.ufs.s3 import S3Store

    store = Store(options.workdir)
    part = datasets.prepare(options.workdir, 'small', options.small_files)
    try:
        store.start()
        store.ensure(part)
        os.environ.update(store.env())
        s3 = S3Store(store.bucket, part.prefix + '/', endpoint_url=store.endpoint)
        available = s3.read_paths()
        if 'lean' not in available:
            raise SystemExit('the lean GET path is off with this botocore; nothing to compare')
        objects = list(s3.list_objects())[:options.objects]

        def reads_through(path):
            """`S3Store.read` itself, through one of its read paths ('lean', 'get_object')."""
            def read_all(chosen):
                return [s3.read(obj.key, obj.etag, 0, obj.size, path=path) for obj in chosen]
            return read_all

        def trio_reads(chosen):
            """`S3Store.read_async`, one at a time on a trio loop (connections pooled)."""
            async def read_all():
                return [await s3.read_async(obj.key, obj.etag, 0, obj.size) for obj in chosen]
            return trio.run(read_all)

        paths = {'get_object': reads_through('get_object'), 'lean': reads_through('lean')}
        if 'trio' in available:
            paths['trio'] = trio_reads
        samples = sample(paths, objects, options.rounds)
    finally:
        store.stop()
        host.cleanup()

    rows = []
    for name, label in (('get_object', 'boto3 `client.get_object`'),
                        ('lean', 'cachefs lean path, as worker threads call it (`ufs/s3_get.py`)'),
                        ('trio', 'cachefs lean path on the trio thread (`ufs/s3_trio.py`)')):
        if name not in samples:
            continue
        cpu = statistics.median(c for c, _ in samples[name])
        wall = statistics.median(w for _, w in samples[name])
        rows.append([label, f'{cpu:.2f}', f'{wall:.2f}'])
    sdk_cpu = statistics.median(c for c, _ in samples['get_object'])
    ratios = ', '.join(f'{name} {sdk_cpu / statistics.median(c for c, _ in samples[name]):.1f}x'
                       for name in samples if name != 'get_object')
    table = report.markdown_table(['GET path', 'CPU ms per GET', 'wall ms per GET (1 at a time)'],
                                  rows)
    text = (f'{table}\n\nLess CPU per GET than `get_object`: {ratios}. Objects: '
            f'{len(objects)} files of {part.describe()}, read whole with a Range and If-Match '
            f'header, one at a time; medians of {options.rounds} rounds.')
    print(text)
    if options.write_results:
        load = os.getloadavg()[0]
        body = '\n'.join([
            f"- command: `{' '.join(['python', 'bench/get_cost.py', *(argv or sys.argv[1:])])}`",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f'- machine: {os.cpu_count()} cores, shared (1-minute load average {load:.1f} at '
            f'the end); the store is SeaweedFS on loopback', '', text])
        report.write_results(BENCH_DIR / 'RESULTS.md', 'get-cost', body)
    return 0


if __name__ == '__main__':
    sys.exit(main())
