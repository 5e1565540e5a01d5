"""`python bench/cluster.py`: cachefs on the three-node rig (tests/support/cluster_rig.py) with
and without the cluster tier (`--cluster memcached://...`), far-store bytes and requests counted
on the wire.

The rig: --nodes network namespaces, each with its own memcached (capacity C = --capacity on an
extstore file, --engine-memory of RAM) and its own cachefs mount (SSD tier --ssd, memory tier
--memory-cache; both smaller than the dataset). The far store is a SeaweedFS of the run's own
behind a CountingProxy on the rig's bridge. The dataset: files of --file-size, --dataset-factor x C
in all (2.5 C: larger than any node's engine, smaller than the pool of all of them).

Per mode (`off`: no cluster tier; `on`: --cluster with every node's memcached), fresh mounts
with empty caches, then --epochs epochs; in each, every node reads the whole dataset at once with
the others, in its own shuffled order, whole files in 1 MiB reads, and hashes every file
(sha256, checked against the manifest). The page cache is dropped before every epoch. With the
tier on, two more epochs: one with node 1's memcached killed (SIGKILL) a third of the way in,
one after it was restarted (empty).

Figures per epoch: far-store bytes and GET requests (all nodes together, and as a multiple of
the dataset), MiB/s per node, files whose content was wrong, read errors, and each node's
cluster counters from `cachefs stats` (deltas of every stats field whose name starts with
"cluster"). Hashing runs in the reader processes on the same 2 cores as everything else:
compare the modes within a run.

Needs root (namespaces, FUSE, dropping the page cache). Exit status 0, or 1 when a file's
content was wrong or a read failed.
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (REPO, REPO / 'tests'):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

MiB = 1 << 20
GiB = 1 << 30
BUCKET = 'cachefs-cluster-bench'
READ = 1 << 20


def parse_size(text):
    text = str(text).strip().upper()
    scale = {'K': 1 << 10, 'M': MiB, 'G': GiB}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


# -- the reader (`cluster.py reader JSON`, one process per node) --

def run_reader(root, files, seed, progress=None, keep_wrong=None):
    """Read every file of `files` ({relpath: [size, sha256]}) under `root` in a shuffled order;
    counts, bytes and seconds. `progress`: a file this process appends a byte to per file;
    `keep_wrong`: a folder where the bytes read of a file whose sha256 is wrong are written."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    result = {'files': 0, 'bytes': 0, 'wrong': [], 'errors': []}
    buffer = bytearray(READ)
    start = time.monotonic()
    tick = open(progress, 'ab', buffering=0) if progress else None
    for relpath in order:
        digest = hashlib.sha256()
        size = 0
        content = [] if keep_wrong else None
        try:
            with open(os.path.join(root, relpath), 'rb', buffering=0) as f:
                while True:
                    n = f.readinto(buffer)
                    if not n:
                        break
                    digest.update(memoryview(buffer)[:n])
                    if content is not None:
                        content.append(bytes(buffer[:n]))
                    size += n
        except OSError as exc:
            result['errors'].append(f'{relpath}: {exc}')
            continue
        result['files'] += 1
        result['bytes'] += size
        if [size, digest.hexdigest()] != list(files[relpath]):
            result['wrong'].append(relpath)
            if content is not None:
                Path(keep_wrong).mkdir(parents=True, exist_ok=True)
                Path(keep_wrong, f'{seed}-{relpath}').write_bytes(b''.join(content))
        if tick:
            tick.write(b'.')
    result['seconds'] = time.monotonic() - start
    return result


# -- the bench --

def make_dataset(far, options):
    """Upload the dataset once (seeded; a later run with the same sizes reuses it); its
    manifest {relpath: [size, sha256]}."""
    total = int(options.capacity_bytes * options.dataset_factor)
    count = max(1, round(total / options.file_size_bytes))
    prefix = f'd{options.file_size_bytes}x{count}'
    saved = Path(options.workdir) / f'{prefix}.json'
    client = far.client()
    far.create_bucket(BUCKET)
    if saved.exists():
        manifest = json.loads(saved.read_text())
        listed = {}
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=BUCKET,
                                                                     Prefix=prefix + '/'):
            listed.update({o['Key'][len(prefix) + 1:]: o['Size'] for o in page.get('Contents', ())})
        if listed == {k: v[0] for k, v in manifest.items()}:
            return prefix, manifest

    def put(i):
        data = random.Random(f'cluster-{i}').randbytes(options.file_size_bytes)
        relpath = f'shard-{i:05d}.bin'
        client.put_object(Bucket=BUCKET, Key=f'{prefix}/{relpath}', Body=data)
        return relpath, [len(data), hashlib.sha256(data).hexdigest()]
    with ThreadPoolExecutor(4) as pool:
        manifest = dict(pool.map(put, range(count)))
    saved.write_text(json.dumps(manifest))
    return prefix, manifest


def stats_of(mounted):
    try:
        return mounted.stats()
    except OSError:
        return {}


GAUGES = ('cluster_peers', 'cluster_peers_up', 'cluster_fill_queue')


def cluster_deltas(before, after):
    """The epoch's change of every cluster counter; gauges as they are at its end."""
    keys = sorted(k for k in after if k.startswith('cluster') and isinstance(after[k], (int, float))
                  and not isinstance(after[k], bool))
    return {k: after[k] if k in GAUGES else after[k] - before.get(k, 0) for k in keys}


def run_epoch(rig, mounts, proxy, manifest, epoch, kill_after=None, kill_node=1,
              keep_wrong=None):
    """Every node reads the dataset at once; the epoch's figures."""
    from cachefs.demo.pagecache import drop_page_cache
    drop_page_cache()
    proxy.reset()
    before = [stats_of(m) for m in mounts]
    progress = [m.node.folder / f'progress-{epoch}' for m in mounts]
    procs = []
    for m, tick in zip(mounts, progress):
        tick.unlink(missing_ok=True)
        spec = {'root': str(m.path), 'files': manifest, 'seed': epoch * 100 + m.node.index,
                'progress': str(tick), 'keep_wrong': keep_wrong}
        procs.append(subprocess.Popen([sys.executable, __file__, 'reader'], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
        procs[-1].stdin.write(json.dumps(spec))
        procs[-1].stdin.close()
    killed = {}
    if kill_after is not None:
        def kill():
            # a third of the victim's files read (by the progress file), or kill_after seconds
            deadline = time.monotonic() + kill_after
            while time.monotonic() < deadline:
                done = progress[kill_node].stat().st_size if progress[kill_node].exists() else 0
                if done >= len(manifest) / 3:
                    break
                time.sleep(0.05)
            killed['at_far_bytes'] = proxy.bytes_sent
            rig.nodes[kill_node].memcached.kill()
            killed['seconds_in'] = round(time.monotonic() - start, 2)
        start = time.monotonic()
        killer = threading.Thread(target=kill)
        killer.start()
    results = [json.loads(p.stdout.read()) for p in procs]
    for p in procs:
        p.wait()
    if kill_after is not None:
        killer.join()
    after = [stats_of(m) for m in mounts]
    dataset = sum(size for size, _ in manifest.values())
    row = {'epoch': epoch, 'far_bytes': proxy.bytes_sent, 'far_gets': proxy.count('GET'),
           'far_x_dataset': round(proxy.bytes_sent / dataset, 3),
           'mib_s_per_node': [round(r['bytes'] / MiB / r['seconds'], 1) for r in results],
           'wrong_files': sum(len(r['wrong']) for r in results),
           'read_errors': sum(len(r['errors']) for r in results),
           'files_read': sum(r['files'] for r in results),
           'cluster': [cluster_deltas(b, a) for b, a in zip(before, after)]}
    if killed:
        row['killed'] = killed
    for r in results:
        for problem in (r['wrong'] + r['errors'])[:5]:
            print(f'epoch {epoch}: {problem}', file=sys.stderr)
    return row


def run_mode(rig, proxy, far, prefix, manifest, mode, options):
    env = dict(os.environ, **{k: v for k, v in far.env().items() if k != 'AWS_ENDPOINT_URL'},
               CACHEFS_CONFIG='/dev/null')
    args = ['--endpoint-url', proxy.endpoint]
    if mode == 'on':
        for node in rig.nodes:
            node.start_memcached(memory=options.engine_memory, disk=options.capacity)
        args += ['--cluster', rig.cluster_url(), *options.cluster_args]
    mounts = [node.mount(f's3://{BUCKET}/{prefix}', *args, *options.mount_args, env=env,
                         name=f'mnt-{mode}', block_size=options.block,
                         cache_size=options.ssd, memory_cache_size=options.memory_cache,
                         log_level='info')
              for node in rig.nodes]
    rows = []
    keep = options.keep_wrong and str(Path(options.keep_wrong, mode))
    try:
        for epoch in range(1, options.epochs + 1):
            rows.append(dict(run_epoch(rig, mounts, proxy, manifest, epoch, keep_wrong=keep),
                             mode=mode))
            print(json.dumps(rows[-1]), flush=True)
        if mode == 'on' and not options.no_kill:
            last = rows[-1]
            seconds = max(sum(manifest[k][0] for k in manifest) / MiB / max(s, 0.1)
                          for s in last['mib_s_per_node'])
            rows.append(dict(run_epoch(rig, mounts, proxy, manifest, options.epochs + 1,
                                       kill_after=seconds, keep_wrong=keep),
                             mode='on, node 1 engine killed'))
            print(json.dumps(rows[-1]), flush=True)
            rig.nodes[1].memcached.start()
            rows.append(dict(run_epoch(rig, mounts, proxy, manifest, options.epochs + 2,
                                       keep_wrong=keep),
                             mode='on, node 1 engine restarted (empty)'))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for m in mounts:
            m.unmount()
        for node in rig.nodes:
            node.mounts.clear()
            if 'memcached' in node.engines:
                node.engines.pop('memcached').stop()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-cluster-bench')
    parser.add_argument('--nodes', type=int, default=3)
    parser.add_argument('--capacity', default='1G', help="each node's engine capacity C")
    parser.add_argument('--engine-memory', default='128M', help="each memcached's RAM")
    parser.add_argument('--dataset-factor', type=float, default=2.5)
    parser.add_argument('--file-size', default='64M')
    parser.add_argument('--ssd', default='512M', help="each node's SSD tier (--cache-size)")
    parser.add_argument('--memory-cache', default='256M', help="each node's memory tier")
    parser.add_argument('--block', default='4M')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--modes', default='off,on')
    parser.add_argument('--no-kill', action='store_true', help='skip the killed-engine epochs')
    parser.add_argument('--cluster-args', default='',
                        help='more mount options for the tier, space-separated')
    parser.add_argument('--mount-args', default='', help='more mount options, space-separated')
    parser.add_argument('--keep-wrong', help='a folder for the bytes read of files whose sha256 '
                        'was wrong (per mode, named EPOCH*100+NODE-FILE)')
    parser.add_argument('--json-out')
    options = parser.parse_args(argv)
    options.capacity_bytes = parse_size(options.capacity)
    options.file_size_bytes = parse_size(options.file_size)
    options.cluster_args = options.cluster_args.split()
    options.mount_args = options.mount_args.split()
    from cachefs.demo.seaweed import SeaweedServer
    from support.cluster_rig import ClusterRig
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    far = SeaweedServer(workdir / 'far', log_path=workdir / 'far-weed.log')
    far.start()
    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        prefix, manifest = make_dataset(far, options)
        dataset = sum(size for size, _ in manifest.values())
        print(f'dataset: {len(manifest)} files, {dataset / GiB:.2f} GiB', flush=True)
        logs = workdir / f'logs-{time.strftime("%Y%m%d-%H%M%S")}'    # kept after the run
        with ClusterRig(workdir, nodes=options.nodes, log_dir=logs) as rig:
            try:
                proxy = rig.store_proxy(far.s3_port)
                for mode in options.modes.split(','):
                    rows += run_mode(rig, proxy, far, prefix, manifest, mode, options)
            finally:
                rig.close()
                rig.remove_files()
    finally:
        far.stop(timeout=2)
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'command': ' '.join(['bench/cluster.py'] + sys.argv[1:]),
              'dataset_bytes': dataset, 'files': len(manifest),
              'options': {k: v for k, v in vars(options).items()}, 'rows': rows}
    if options.json_out:
        Path(options.json_out).write_text(json.dumps(result, indent=1))
    bad = any(r['wrong_files'] or r['read_errors'] for r in rows)
    return 1 if bad else 0


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'reader':
        print(json.dumps(run_reader(**json.loads(sys.stdin.read()))))
    else:
        sys.exit(main())
