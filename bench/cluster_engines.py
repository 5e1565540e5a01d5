"""`python bench/cluster_engines.py`: the candidate engines of the cluster tier, side by side on
the three-node rig (tests/support/cluster_rig.py), from raw clients (no cachefs).

Engines (one instance per node, each with capacity C = --capacity):
- `memcached`: memcached 1.6 with extstore, C on an extstore file, --memory of RAM; items of one
  4 MiB block each (`-I 8m`); rendezvous hashing in the client. Once per --ext-page-sizes.
- `redis`: one plain redis-server per node, memory only, `maxmemory` C, allkeys-lru, no
  persistence; the same client-side rendezvous hashing.
- `seaweed`: SeaweedFS remote storage: a near `weed server` (root namespace) mounts the far
  bucket with `remote.mount` and is read through its S3 gateway; its figures are per object
  (fill size, time to first byte, far bytes, ETag, what a kill keeps), not per 4 MiB block item.

Figures per engine:
- set and get MiB/s of 4 MiB blocks, one client process per node running in that node's
  namespace, all at once: each sets K blocks (K x block = C / 2, so the pool holds them all),
  then each gets every node's blocks in its own shuffled order and compares every byte;
- capacity: fresh engines, 1.5 C of blocks per node written (an over-full write), then every key
  read back: bytes kept (intact) / capacity configured (C x nodes); corrupt blocks counted;
- memory: the engines' RSS per GiB stored, after the throughput fill;
- failure: with the throughput fill in place, node 1's engine killed: what a get of every key
  gives (hits, errors, the longest wait of a failed get), then restarted: hits again, and after
  the misses are set again.

The client processes and the engines share this machine's cores, so MiB/s is what one machine
gives all three nodes together; compare engines within a run. Needs root (namespaces).
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
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (REPO, REPO / 'tests'):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

MiB = 1 << 20
GiB = 1 << 30
BODY_SEED = 20261130
# SeaweedFS refuses remote endpoints on loopback or private addresses (an SSRF guard), so the
# far store's proxy listens on an address of the benchmarking range (RFC 2544) on the bridge.
SEAWEED_FAR_ADDRESS = '198.18.{}.1'


# -- the raw client (also run inside a node's namespace: `cluster_engines.py client ...`) --

def rendezvous(addresses, key):
    """The address that holds `key`: the highest hash of (address, key)."""
    return max(addresses, key=lambda a: hashlib.blake2b(f'{a}/{key}'.encode(),
                                                        digest_size=8).digest())


def block_value(key, body):
    """The bytes of block `key`: the key, padded, over a shared random body."""
    head = key.encode().ljust(64, b'\0')
    return head + body[len(head):]


class RawClient:
    """get/set of whole blocks on one engine kind, keys spread by rendezvous hashing."""

    def __init__(self, engine, addresses, connect_timeout=0.2, timeout=10.0):
        self.engine, self.addresses = engine, list(addresses)
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._clients = {}

    def _client(self, address):
        client = self._clients.get(address)
        if client is None:
            host, port = address.rsplit(':', 1)
            if self.engine == 'redis':
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry
                # no retries: redis-py's default retries a refused connection with backoff for
                # seconds, which would measure the client, not the engine
                client = redis.Redis(host, int(port), socket_connect_timeout=self.connect_timeout,
                                     socket_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
            else:
                from pymemcache.client.base import Client
                client = Client((host, int(port)), connect_timeout=self.connect_timeout,
                                timeout=self.timeout, no_delay=True, default_noreply=False)
            self._clients[address] = client
        return client

    def _drop(self, address):
        client = self._clients.pop(address, None)
        if client is not None:
            try:
                client.close()
            except Exception:       # noqa: BLE001  a broken client is dropped either way
                pass

    def set(self, key, value):
        address = rendezvous(self.addresses, key)
        try:
            return bool(self._client(address).set(key, value))
        except Exception:           # noqa: BLE001  any engine or socket error is a failed set
            self._drop(address)
            return False

    def get(self, key):
        """('hit', value), ('miss', None) or ('error', None)."""
        address = rendezvous(self.addresses, key)
        try:
            value = self._client(address).get(key)
        except Exception:           # noqa: BLE001  any engine or socket error is a failed get
            self._drop(address)
            return 'error', None
        return ('miss', None) if value is None else ('hit', value)


def run_client(engine, addresses, phase, keys, block, seed):
    """One client's pass over `keys`: a dict of counts and seconds (JSON on stdout)."""
    body = random.Random(BODY_SEED).randbytes(block)
    client = RawClient(engine, addresses)
    keys = list(keys)
    random.Random(seed).shuffle(keys)
    counts = {'hit': 0, 'miss': 0, 'error': 0, 'corrupt': 0, 'stored': 0, 'failed': 0}
    moved = 0
    slowest_error = 0.0
    missing = []
    start = time.monotonic()
    for key in keys:
        t0 = time.monotonic()
        if phase == 'set':
            ok = client.set(key, block_value(key, body))
            counts['stored' if ok else 'failed'] += 1
            moved += block if ok else 0
            continue
        outcome, value = client.get(key)
        if outcome == 'hit':
            moved += len(value)
            if value != block_value(key, body):
                outcome = 'corrupt'
        elif outcome == 'error':
            slowest_error = max(slowest_error, time.monotonic() - t0)
        counts[outcome] += 1
        if outcome != 'hit':
            missing.append(key)
    seconds = time.monotonic() - start
    return dict(counts, bytes=moved, seconds=seconds, slowest_error_s=slowest_error,
                missing=missing)


# -- the bench --

def keys_of(tag, node, count):
    return [f'{tag}-n{node}-{i:06d}' for i in range(count)]


def on_nodes(rig, engine, addresses, phase, key_lists, block, in_namespace=True):
    """`run_client` on every node at once (node i: key_lists[i]); the list of their results."""
    procs = []
    for node, keys in zip(rig.nodes, key_lists):
        argv = [sys.executable, __file__, 'client', json.dumps(
            {'engine': engine, 'addresses': addresses, 'phase': phase, 'keys': keys,
             'block': block, 'seed': node.index})]
        command = node.command(argv) if in_namespace else argv
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    return _answers(procs, 'client')


def _answers(procs, what):
    """The JSON each client process prints, once all have ended (30 minutes at most each)."""
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f'{what} exited with {proc.returncode}')
        results.append(json.loads(out))
    return results


def mib_per_s(results):
    """Per-node MiB/s (each client's bytes / its seconds) and all nodes together."""
    per_node = [r['bytes'] / MiB / r['seconds'] for r in results if r['seconds'] > 0]
    total = sum(r['bytes'] for r in results) / MiB / max(r['seconds'] for r in results)
    return {'per_node': [round(x, 1) for x in per_node], 'total': round(total, 1)}


def summed(results, *names):
    return {name: sum(r[name] for r in results) for name in names}


def start_engines(rig, engine, options):
    for node in rig.nodes:
        for running in list(node.engines.values()):
            running.stop()
        node.engines.clear()
        if engine.startswith('memcached'):
            page = int(engine.split('-p')[1]) if '-p' in engine else 64
            node.start_memcached(memory=options.memory, disk=options.capacity,
                                 extstore={'ext_page_size': page,
                                           'ext_wbuf_size': min(16, page // 2 or 1)})
        else:
            folder = node.folder / 'redis'
            folder.mkdir(parents=True, exist_ok=True)
            node.start_engine('redis', [
                'redis-server', '--bind', node.ip, '--port', '6379', '--protected-mode', 'no',
                '--save', '', '--appendonly', 'no', '--dir', folder,
                '--maxmemory', f'{options.capacity_bytes}', '--maxmemory-policy', 'allkeys-lru'],
                6379)
    name = 'redis' if engine == 'redis' else 'memcached'
    return name, rig.engine_addresses(name)


def engine_rss(rig, name):
    return sum(node.engines[name].rss() for node in rig.nodes)


def bench_block_engine(rig, engine, options):
    block, nodes = options.block_bytes, len(rig.nodes)
    name, addresses = start_engines(rig, engine, options)
    kind = 'redis' if engine == 'redis' else 'memcached'
    per_node = options.capacity_bytes // 2 // block
    fill = [keys_of('t', n, per_node) for n in range(nodes)]
    every = [k for keys in fill for k in keys]
    row = {'engine': engine, 'capacity_per_node': options.capacity_bytes,
           'memory_per_node': options.memory_bytes if kind == 'memcached' else
           options.capacity_bytes}
    sets = on_nodes(rig, kind, addresses, 'set', fill, block)
    row['set_mib_s'] = mib_per_s(sets)
    row['set_failed'] = summed(sets, 'failed')['failed']
    gets = on_nodes(rig, kind, addresses, 'get', [every] * nodes, block)
    row['get_mib_s'] = mib_per_s(gets)
    row['get_counts'] = summed(gets, 'hit', 'miss', 'error', 'corrupt')
    stored = per_node * nodes * block
    row['rss_bytes'] = engine_rss(rig, name)
    row['rss_per_gib_stored'] = row['rss_bytes'] / (stored / GiB)

    # failure: node 1's engine killed, every key read from the root namespace
    victim = rig.nodes[1].engines[name]
    victim.kill()
    dead = on_nodes(rig, kind, addresses, 'get', [every], block, in_namespace=False)[0]
    victim.start()
    back = on_nodes(rig, kind, addresses, 'get', [every], block, in_namespace=False)[0]
    refill = on_nodes(rig, kind, addresses, 'set', [back['missing']], block,
                      in_namespace=False)[0]
    again = on_nodes(rig, kind, addresses, 'get', [every], block, in_namespace=False)[0]
    row['kill'] = {
        'keys': len(every),
        'killed': {k: dead[k] for k in ('hit', 'miss', 'error', 'corrupt')},
        'killed_slowest_error_s': round(dead['slowest_error_s'], 4),
        'killed_seconds': round(dead['seconds'], 2),
        'restarted': {k: back[k] for k in ('hit', 'miss', 'error', 'corrupt')},
        'refilled': refill['stored'],
        'after_refill': {k: again[k] for k in ('hit', 'miss', 'error', 'corrupt')},
    }

    # capacity: fresh engines, an over-full write of 1.5 C per node
    start_engines(rig, engine, options)
    over = int(options.capacity_bytes * 1.5) // block
    written = [keys_of('c', n, over) for n in range(nodes)]
    sets = on_nodes(rig, kind, addresses, 'set', written, block)
    read = on_nodes(rig, kind, addresses, 'get', [[k for ks in written for k in ks]], block,
                    in_namespace=False)[0]
    configured = options.capacity_bytes * nodes
    row['capacity'] = {
        'written_bytes': sum(r['stored'] for r in sets) * block,
        'set_failed': sum(r['failed'] for r in sets),
        'kept_bytes': read['hit'] * block,
        'configured_bytes': configured,
        'efficiency': round(read['hit'] * block / configured, 3),
        'corrupt': read['corrupt'], 'errors': read['error'],
        'rss_bytes': engine_rss(rig, name),
    }
    for node in rig.nodes:
        node.engines[name].stop()
    return row


def bench_seaweed(rig, far, far_bucket, options, workdir):
    """SeaweedFS remote storage: a near weed server mounts the far bucket (see the docstring)."""
    from cachefs.demo.seaweed import SeaweedServer, find_weed
    block, nodes = options.block_bytes, len(rig.nodes)
    address = SEAWEED_FAR_ADDRESS.format(rig.subnet.network_address.packed[2])
    subprocess.run(['ip', 'addr', 'add', f'{address}/32', 'dev', rig.bridge], check=True)
    proxy = rig.store_proxy(far.s3_port, host=address)
    near = SeaweedServer(workdir / 'near', log_path=workdir / 'near-weed.log')
    near.start()
    row = {'engine': 'seaweed', 'near_instances': 1}
    try:
        def shell(command):
            result = subprocess.run([find_weed(), 'shell', f'-master=127.0.0.1:{near.master_port}'],
                                    input=command + '\nexit\n', capture_output=True, text=True,
                                    timeout=120)
            if 'error' in result.stdout.lower() or result.returncode != 0:
                raise RuntimeError(f'weed shell {command!r}: {result.stdout[-500:]} '
                                   f'{result.stderr[-500:]}')
        shell(f'remote.configure -name=far -type=s3 -s3.access_key={far.access_key} '
              f'-s3.secret_key={far.secret_key} -s3.endpoint={proxy.endpoint} '
              f'-s3.region=us-east-1 -s3.force_path_style=true')
        proxy.reset()
        t0 = time.monotonic()
        shell(f'remote.mount -dir=/buckets/near -remote=far/{far_bucket}')
        row['mount_seconds'] = round(time.monotonic() - t0, 2)
        row['mount_far_requests'] = proxy.count()
        client, far_client = near.client(), far.client()

        def first_byte(key):
            before, requests = proxy.bytes_sent, proxy.count()
            t0 = time.monotonic()
            answer = client.get_object(Bucket='near', Key=key, Range=f'bytes=0-{MiB - 1}')
            answer['Body'].read()
            return {'ttfb_s': round(time.monotonic() - t0, 3),
                    'far_bytes': proxy.bytes_sent - before,
                    'far_requests': proxy.count() - requests,
                    'near_etag': answer['ETag'],
                    'far_etag': far_client.head_object(Bucket=far_bucket, Key=key)['ETag']}
        row['large_object'] = dict(first_byte('large/object.bin'), size=options.large_object)
        row['large_object_again'] = first_byte('large/object.bin')
        row['small_object'] = dict(first_byte('blocks/t-n0-000000'), size=block)
        # the blocks: a cold pass (the fill) by one client, then warm gets from 3 clients
        keys = [f'blocks/{k}' for n in range(nodes)
                for k in keys_of('t', n, options.capacity_bytes // 2 // block)]
        env = dict(os.environ, **near.env())
        proxy.reset()
        cold = _s3_gets(env, [keys], block)[0]
        row['fill_mib_s'] = round(cold['bytes'] / MiB / cold['seconds'], 1)
        row['fill_far_bytes'] = proxy.bytes_sent
        proxy.reset()
        warm = _s3_gets(env, [keys] * nodes, block)
        row['get_mib_s'] = mib_per_s(warm)
        row['get_counts'] = summed(warm, 'hit', 'miss', 'error', 'corrupt')
        row['warm_far_bytes'] = proxy.bytes_sent
        stored = len(keys) * block + options.large_object
        row['rss_bytes'] = _rss(near.pid)
        row['rss_per_gib_stored'] = row['rss_bytes'] / (stored / GiB)
        # kill and restart: what the near store keeps
        os.kill(near.pid, signal.SIGKILL)
        near.stop()
        near.start()
        env = dict(os.environ, **near.env())
        proxy.reset()
        after = _s3_gets(env, [keys], block)[0]
        row['kill'] = {'restarted': {k: after[k] for k in ('hit', 'miss', 'error', 'corrupt')},
                       'far_bytes_after_restart': proxy.bytes_sent}
    finally:
        near.stop(timeout=2)
    return row


def _rss(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def _s3_gets(env, key_lists, block):
    """Whole-object GETs of `keys` from the near gateway, one client process per list."""
    procs = [subprocess.Popen([sys.executable, __file__, 's3client', json.dumps(
        {'keys': keys, 'block': block, 'seed': i})], stdout=subprocess.PIPE, text=True, env=env)
        for i, keys in enumerate(key_lists)]
    return _answers(procs, 's3 client')


def run_s3_client(keys, block, seed):
    import boto3
    from botocore.config import Config
    client = boto3.client('s3', config=Config(s3={'addressing_style': 'path'},
                                              retries={'max_attempts': 1}))
    body = random.Random(BODY_SEED).randbytes(block)
    keys = list(keys)
    random.Random(seed).shuffle(keys)
    counts = {'hit': 0, 'miss': 0, 'error': 0, 'corrupt': 0}
    moved, start = 0, time.monotonic()
    for key in keys:
        try:
            value = client.get_object(Bucket='near', Key=key)['Body'].read()
        except Exception:       # noqa: BLE001  any failure counts as an error
            counts['error'] += 1
            continue
        moved += len(value)
        counts['hit' if value == block_value(key.split('/', 1)[1], body) else 'corrupt'] += 1
    return dict(counts, bytes=moved, seconds=time.monotonic() - start)


def upload_far(far, bucket, options, nodes):
    from concurrent.futures import ThreadPoolExecutor
    client = far.client()
    far.create_bucket(bucket)
    body = random.Random(BODY_SEED).randbytes(options.block_bytes)
    keys = [k for n in range(nodes) for k in keys_of('t', n, options.capacity_bytes // 2
                                                        // options.block_bytes)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=f'blocks/{k}',
                                                  Body=block_value(k, body)), keys))
    client.put_object(Bucket=bucket, Key='large/object.bin',
                      Body=os.urandom(options.large_object))


def parse_size(text):
    text = text.strip().upper()
    scale = {'K': 1 << 10, 'M': MiB, 'G': GiB}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='/var/tmp/cachefs-cluster-engines')
    parser.add_argument('--nodes', type=int, default=3)
    parser.add_argument('--capacity', default='1G', help='engine capacity per node (C)')
    parser.add_argument('--memory', default='128M', help="memcached's RAM per node")
    parser.add_argument('--block', default='4M')
    parser.add_argument('--ext-page-sizes', default='64,16',
                        help='extstore page sizes (MiB) to measure, one memcached row each')
    parser.add_argument('--engines', default='memcached,redis,seaweed')
    parser.add_argument('--large-object', default='256M',
                        help='size of the large object of the SeaweedFS time to first byte')
    parser.add_argument('--json-out')
    options = parser.parse_args(argv)
    options.capacity_bytes = parse_size(options.capacity)
    options.memory_bytes = parse_size(options.memory)
    options.block_bytes = parse_size(options.block)
    options.large_object = parse_size(options.large_object)
    from cachefs.demo.seaweed import SeaweedServer
    from support.cluster_rig import ClusterRig
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    engines = options.engines.split(',')
    with ClusterRig(workdir, nodes=options.nodes) as rig:
        for engine in engines:
            if engine == 'memcached':
                for page in options.ext_page_sizes.split(','):
                    rows.append(bench_block_engine(rig, f'memcached-p{page}', options))
                    print(json.dumps(rows[-1]), flush=True)
            elif engine == 'redis':
                rows.append(bench_block_engine(rig, 'redis', options))
                print(json.dumps(rows[-1]), flush=True)
        if 'seaweed' in engines:
            far = SeaweedServer(workdir / 'far', log_path=workdir / 'far-weed.log')
            far.start()
            try:
                bucket = f'far-{rig.prefix}'
                upload_far(far, bucket, options, options.nodes)
                try:
                    rows.append(bench_seaweed(rig, far, bucket, options, workdir / rig.prefix))
                except Exception as exc:       # noqa: BLE001  reported as what failed
                    rows.append({'engine': 'seaweed', 'failed': repr(exc)})
                print(json.dumps(rows[-1]), flush=True)
            finally:
                far.stop(timeout=2)
    leftovers = rig.leftovers()
    rig.remove_files()
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'command': ' '.join([Path(sys.argv[0]).name] + sys.argv[1:]),
              'options': {k: v for k, v in vars(options).items()},
              'rows': rows, 'leftovers_after_close': leftovers}
    if options.json_out:
        Path(options.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == 'client':
        print(json.dumps(run_client(**json.loads(sys.argv[2]))))
    elif len(sys.argv) > 2 and sys.argv[1] == 's3client':
        print(json.dumps(run_s3_client(**json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
