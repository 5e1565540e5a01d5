"""Cost of the saved listing at ImageNet scale: save and load time, file size and peak RSS.

    .venv/bin/python bench/listing_cost.py [--objects 1281167] [--folders 1000]

Each phase runs in a fresh interpreter so that its peak RSS (ru_maxrss) is its own; the load
phase reports the time to decode the file alone and to build the ObjectInfo list as well.
The remount phases go on to the tree: from an ObjectInfo list (as before) and from the file's
columns (as the daemon does now): time, peak RSS, and RSS kept (the tree).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SOURCE = 's3://bench/imagenet/train'


def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(count, folders, etag_format='"%032x"'):
    """`count` ImageNet-like ObjectInfo in `folders` class folders (also bench/tree_cost.py's)."""
    from cachefs.ufs.base import ObjectInfo
    per = -(-count // folders)
    objects = []
    for i in range(count):
        c, j = divmod(i, per)
        name = f'n{c:08d}'
        objects.append(ObjectInfo(f'{name}/{name}_{j}.JPEG', 100_000 + (i * 7919) % 20_000,
                                  etag_format % (i * 2654435761 % (1 << 128)),
                                  1_700_000_000_000_000_000 + i * 1_000_003))
    return objects


def phase_save(folder, count, folders):
    from cachefs.cache import listing
    objects = synthetic(count, folders)
    before, start = rss_mib(), time.perf_counter()
    listing.save_listing(folder, SOURCE, objects, time.time() - 60)
    seconds = time.perf_counter() - start
    return {'save_s': seconds, 'save_peak_over_objects_mib': peak_mib() - before,
            'file_mib': os.path.getsize(os.path.join(folder, listing.FILE_NAME)) / 2**20}


def phase_load(folder):
    from cachefs.cache import listing
    before = rss_mib()
    start = time.perf_counter()
    listed_at, objects = listing.load_listing(folder, SOURCE)
    seconds = time.perf_counter() - start
    results = {'load_s': seconds, 'load_peak_mib': peak_mib() - before,
               'load_rss_after_mib': rss_mib() - before, 'objects': len(objects)}
    del objects
    if hasattr(listing, 'decode_columns'):       # where the load's time goes
        with open(os.path.join(folder, listing.FILE_NAME), 'rb') as f:
            data = f.read()
        start = time.perf_counter()
        _, columns = listing.decode_columns(data, SOURCE)
        results['load_decode_and_check_s'] = time.perf_counter() - start
        start = time.perf_counter()
        columns.objects()
        results['load_build_objectinfo_s'] = time.perf_counter() - start
    return results


def phase_remount(folder, path):
    """The daemon's remount: the saved listing to a tree; `path` 'columns' (the tree built from
    the file's columns, as the daemon does) or 'objects' (an ObjectInfo per file first, as it
    did before)."""
    from cachefs.cache import listing
    from cachefs.namespace import build_tree, build_tree_from_columns
    before = rss_mib()
    start = time.perf_counter()
    if path == 'columns':
        listed_at, columns = listing.load_columns(folder, SOURCE)
        tree = build_tree_from_columns(columns.keys, columns.sizes, columns.etags,
                                       columns.mtimes, int(listed_at * 1e9))
        del columns
    else:
        listed_at, objects = listing.load_listing(folder, SOURCE)
        tree = build_tree(objects, int(listed_at * 1e9))
        del objects
    seconds = time.perf_counter() - start
    return {f'remount_{path}_s': seconds, f'remount_{path}_peak_mib': peak_mib() - before,
            f'remount_{path}_tree_mib': rss_mib() - before, 'files': tree.file_count}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--objects', type=int, default=1_281_167)
    parser.add_argument('--folders', type=int, default=1000)
    parser.add_argument('--phase', choices=('save', 'load', 'remount-columns', 'remount-objects'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--folder', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == 'save':
        print(json.dumps(phase_save(args.folder, args.objects, args.folders)))
        return
    if args.phase == 'load':
        print(json.dumps(phase_load(args.folder)))
        return
    if args.phase and args.phase.startswith('remount-'):
        print(json.dumps(phase_remount(args.folder, args.phase.split('-')[1])))
        return
    with tempfile.TemporaryDirectory() as folder:
        results = {'objects': args.objects}
        for phase in ('save', 'load', 'remount-objects', 'remount-columns'):
            out = subprocess.run([sys.executable, __file__, '--phase', phase, '--folder', folder,
                                  '--objects', str(args.objects), '--folders', str(args.folders)],
                                 check=True, capture_output=True, text=True).stdout
            results.update(json.loads(out))
    for name, value in results.items():
        print(f'{name:28} {value:.2f}' if isinstance(value, float) else f'{name:28} {value}')


if __name__ == '__main__':
    main()
