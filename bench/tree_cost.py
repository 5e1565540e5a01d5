"""Cost of the namespace tree at ImageNet scale: build time, RSS per file and per-op cost.

    .venv/bin/python bench/tree_cost.py [--objects 1281167] [--folders 1000]

Compares the compact tree (`cachefs.namespace`) with the object-per-file tree it replaced
(`tests/support/reference_namespace.py`, a frozen copy), each in a fresh interpreter: the listing
is made first (like `bench/listing_cost.py`'s), then the tree is built; RSS growth is measured
after the build with the listing still alive, as in the daemon. Per-op costs are the tree's part
of a FUSE request, through `Operations._attributes` as the handlers answer them: lookup (parent
inode + name), getattr (inode, at random), a lookup followed by a getattr of its inode (as the
kernel does on a first open) and readdir (per entry, a whole folder).

    .venv/bin/python bench/tree_cost.py --refresh [--objects 1281167]

measures a refresh instead: peak RSS while the old tree is alive, and how long the thread that
answers the kernel is stalled while the new tree is built in a worker thread.
"""

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests'))     # support.reference_namespace


def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def synthetic(count, folders):
    # the listing of bench/listing_cost.py, with ETags as S3 lists them (no quotes)
    from listing_cost import synthetic as listing
    return listing(count, folders, etag_format='%032x')


class _Cache:
    block_size = 1 << 20


def per_op(fn, args, rounds=3):
    """Best of `rounds` of the mean seconds of fn(*a) over args."""
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        for a in args:
            fn(*a)
        best = min(best, (time.perf_counter() - start) / len(args))
    return best


def phase(impl, count, folders):
    if impl == 'compact':
        from cachefs import namespace as ns
    else:
        from support import reference_namespace as ns
    from cachefs.fuse.operations import Operations
    objects = synthetic(count, folders)
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    tree = ns.build_tree(objects, time.time_ns())
    build_s = time.perf_counter() - start
    gc.collect()
    grown = rss_bytes() - before

    ops = Operations(tree, _Cache(), entry_timeout=1, attr_timeout=1, uid=0, gid=0)
    attributes = ops._attributes
    rng = random.Random(0)
    picks = [rng.choice(objects) for _ in range(100_000)]
    folder_inode = {os.fsencode(name): node.inode
                    for name, node in tree.root.children.items()}
    lookups = [(folder_inode[os.fsencode(o.key.partition('/')[0])],
                os.fsencode(o.key.partition('/')[2])) for o in picks]
    inodes = [(tree.lookup(p, n).inode,) for p, n in lookups]
    lookup_s = per_op(lambda p, n: attributes(tree.lookup(p, n)), lookups)
    getattr_s = per_op(lambda i: attributes(tree.get(i)), inodes)

    def lookup_then_getattr(parent, name):    # what the kernel does on a first open()
        attributes(tree.get(attributes(tree.lookup(parent, name)).st_ino))
    pair_s = per_op(lookup_then_getattr, lookups)
    dirs = [tree.get(i) for i in list(folder_inode.values())[:50]]
    if impl == 'compact':
        def readdir(folder):
            children = folder.children
            for index in range(len(folder.sorted_names)):
                attributes(children.at(index))
    else:
        def readdir(folder):
            children = folder.children
            for name in folder.sorted_names:
                attributes(children[name])
    entries = sum(len(d.sorted_names) for d in dirs)
    readdir_s = per_op(readdir, [(d,) for d in dirs]) * len(dirs) / entries
    return {'impl': impl, 'files': tree.file_count, 'dirs': tree.dir_count,
            'build_s': round(build_s, 2), 'rss_growth_mib': round(grown / 2**20, 1),
            'rss_bytes_per_file': round(grown / tree.file_count, 1),
            'lookup_us': round(lookup_s * 1e6, 3), 'getattr_us': round(getattr_s * 1e6, 3),
            'lookup_then_getattr_us': round(pair_s * 1e6, 3),
            'readdir_us_per_entry': round(readdir_s * 1e6, 3)}


def phase_refresh(count, folders):
    """A refresh as the daemon does it (daemon.Daemon.refresh): the current tree alive, a fresh
    listing of ObjectInfo, turned into columns (the objects dropped), the new tree and its
    changes built in a worker thread while this thread keeps looking files up in the old tree.
    Reports the RSS of the old tree alone and the peak during the refresh, per file (over the
    interpreter's RSS before anything was built), and the longest gap between two lookups of
    the answering thread (how long the refresh stalled it)."""
    import resource
    import threading
    from cachefs.cache.listing import Columns
    from cachefs.daemon import _tree_and_changes
    from cachefs.namespace import build_tree
    gc.collect()
    base = rss_bytes()
    objects = synthetic(count, folders)
    old = build_tree(objects, time.time_ns())
    del objects
    gc.collect()
    old_tree = rss_bytes() - base
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    objects = synthetic(count, folders)       # the listing arrives (made here, not timed below)
    listed = time.perf_counter()
    columns = Columns.of(objects)
    del objects
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        tree=_tree_and_changes(old, columns, time.time_ns())))
    names = [(inode, name) for inode, table in list(old.folders.items())[1:] for name in
             table.names[:50]]
    gaps, at, i = [], time.perf_counter(), 0
    worker.start()
    while worker.is_alive():
        parent, name = names[i % len(names)]
        old.lookup(parent, name)
        i += 1
        now = time.perf_counter()
        gaps.append(now - at)
        at = now
    worker.join()
    done = time.perf_counter()
    tree, (changed, entries) = result['tree']
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_before) - base
    return {'files': tree.file_count, 'old_tree_bytes_per_file': round(old_tree / count, 1),
            'refresh_peak_bytes_per_file': round(peak / count, 1),
            'refresh_peak_mib': round(peak / 2**20, 1),
            'listing_made_s': round(listed - start, 2),
            'columns_tree_and_changes_s': round(done - listed, 2),
            'lookups_meanwhile': i, 'longest_lookup_gap_ms': round(max(gaps) * 1e3, 1),
            'changed_folders': len(changed), 'changed_entries': len(entries)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--objects', type=int, default=1_281_167)
    parser.add_argument('--folders', type=int, default=1000)
    parser.add_argument('--phase', choices=('compact', 'reference'), help=argparse.SUPPRESS)
    parser.add_argument('--refresh', action='store_true',
                        help='measure a refresh instead (peak RSS with the old tree alive)')
    args = parser.parse_args()
    if args.refresh:
        print(json.dumps(phase_refresh(args.objects, args.folders)))
        return
    if args.phase:
        print(json.dumps(phase(args.phase, args.objects, args.folders)))
        return
    for impl in ('reference', 'compact'):
        out = subprocess.run([sys.executable, __file__, '--phase', impl, '--objects',
                              str(args.objects), '--folders', str(args.folders)],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == '__main__':
    main()
