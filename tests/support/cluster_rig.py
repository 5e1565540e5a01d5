"""A cluster of "nodes" on one machine, for the cluster tier's tests and benchmarks.

Each node is a network namespace with its own address on a bridge of the root namespace, its own
engine (memcached with extstore, or another engine the engine benchmark starts) and its own
cachefs mount with its own cache folder. The bridge has an address too, so a far store on the
root side (SeaweedFS behind a `CountingProxy` listening on that address) is reachable from every
node, and the test process reaches every node's engine.

    with ClusterRig(workdir, nodes=3) as rig:
        proxy = rig.store_proxy(seaweed.s3_port)          # counts far-store bytes and requests
        for node in rig.nodes:
            node.start_memcached(memory='64M', disk='256M')
        mounts = [node.mount(url, '--endpoint-url', proxy.endpoint, '--cluster', rig.cluster_url(),
                             env=env) for node in rig.nodes]

Facts that shaped it:

* `ip netns exec` also unshares the mount namespace, so a FUSE mount made under it is invisible
  outside: daemons that mount run under `nsenter --net=/run/netns/NAME` (the network namespace
  only); engines, which mount nothing, may run under either.
* Names and the subnet are unique per rig (a random prefix, a /24 no interface or route of the
  machine uses), so rigs of parallel runs do not collide. Interface names are at most 15 bytes.
* Everything a rig makes is undone in `close` (every mount unmounted, every process it started
  stopped by PID, the veth pairs, the namespaces and the bridge deleted), also when a test
  fails. A rig that could not close (its process was killed) leaves a state file in STATE_DIR;
  the next rig removes the namespaces and links of such a rig whose owner is gone
  (`sweep_stale`), never anything of a live one.
* memcached's `ext_page_size` must come before `ext_path` in `-o` (DESIGN.md, "Measured at the
  second look"); `ext_item_age=0` flushes items to extstore at once, so that a large item is not
  evicted from memory before it is written.

Known limitations: needs root (network namespaces, FUSE), `ip` (iproute2), `nsenter`
(util-linux) and memcached; IPv4 only; an engine killed by a signal is restarted empty (extstore
keeps nothing across restarts).
"""

import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .proxy import CountingProxy

log = logging.getLogger(__name__)

STATE_DIR = Path('/run/cachefs-rig')
MEMCACHED_PORT = 11211
NAME_PREFIX = 'cfr'                  # cfr<6 hex>: 9 bytes, + '-br' / '-h0' / '-n0' fits 15

# Measured to keep large items (DESIGN.md; docs/cluster.md): 64 MiB pages, 16 MiB write buffers,
# 4 I/O threads, flush at once, and the flusher asleep at most 10 ms: at its default (1 s) sets
# of 4 MiB items at a few hundred MiB/s fill the RAM before it wakes, and memory evicts items it
# never wrote (128 MiB of RAM kept 50 of 64 items; with 10 ms, 128 of 128, and it costs ~1% of a
# core when idle; 100 us cost 15%).
EXTSTORE_OPTIONS = {'ext_page_size': 64, 'ext_wbuf_size': 16, 'ext_threads': 4,
                    'ext_item_age': 0, 'ext_max_sleep': 10000}


def process_alive(pid):
    """True while `pid` runs; a zombie waiting for its reaper counts as gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def unavailable():
    """Why a rig cannot run here (a sentence), or None when it can."""
    if os.geteuid() != 0:
        return 'the cluster rig needs root (network namespaces)'
    for tool in ('ip', 'nsenter', 'memcached'):
        if shutil.which(tool) is None:
            return f'the cluster rig needs {tool}'
    return None


def _ip(*args, check=True):
    return subprocess.run(['ip', *args], capture_output=True, text=True, check=check, timeout=30)


def netns_list():
    """The names of the network namespaces of this machine."""
    out = _ip('-o', 'netns', 'list', check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_list():
    """The names of the network interfaces of the root namespace."""
    out = _ip('-o', 'link', 'show', check=False).stdout
    return {line.split(':')[1].strip().split('@')[0] for line in out.splitlines() if ':' in line}


def free_subnet(rng):
    """A /24 in 10.0.0.0/8 that no address or route of the root namespace overlaps."""
    used = []
    for args in (('-4', '-o', 'addr', 'show'), ('-4', 'route', 'show', 'table', 'all')):
        for word in _ip(*args, check=False).stdout.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    for _ in range(1000):
        net = ipaddress.ip_network(f'10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24')
        if not any(net.overlaps(other) for other in used if other.prefixlen > 0):
            return net
    raise RuntimeError('no free /24 in 10.0.0.0/8')


def wait_for_port(host, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop_process(proc, timeout=10.0, sig=signal.SIGTERM):
    """Stop a process this module started (a Popen) by its PID, then reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def sweep_stale():
    """Remove the namespaces and links of rigs whose owning process is gone."""
    if not STATE_DIR.is_dir():
        return
    for path in STATE_DIR.glob(f'{NAME_PREFIX}*.json'):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if process_alive(state.get('owner', 0)):
            continue
        prefix = path.stem
        for name in netns_list():
            if name.startswith(prefix + '-'):
                _ip('netns', 'del', name, check=False)
        for name in link_list():
            if name.startswith(prefix + '-'):
                _ip('link', 'del', name, check=False)
        log.warning('removed the namespaces and links of stale rig %s', prefix)
        path.unlink(missing_ok=True)


class Engine:
    """One engine process in a node's network namespace, stopped, killed and restarted by PID."""

    def __init__(self, node, name, argv, port, log_path):
        self.node, self.name, self.argv, self.port = node, name, argv, port
        self.log_path = log_path
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self):
        return f'{self.node.ip}:{self.port}'

    def start(self, timeout=10.0):
        if self.running:
            return self
        with open(self.log_path, 'ab') as log_file:
            self.proc = subprocess.Popen(self.node.command(self.argv), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_for_port(self.node.ip, self.port, timeout)
        except OSError:
            self.stop()
            raise RuntimeError(f'{self.name} on {self.node.name} did not start: '
                               f'{Path(self.log_path).read_text()[-2000:]}') from None
        return self

    def kill(self):
        """SIGKILL, as a crash would: the engine loses what it held."""
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGKILL)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)

    def restart(self):
        self.kill()
        return self.start()

    def memcached_stats(self, timeout=5.0):
        """memcached's `stats` as {name: text} (this engine must be a memcached)."""
        with socket.create_connection((self.node.ip, self.port), timeout=timeout) as sock:
            sock.sendall(b'stats\r\n')
            answer = b''
            while not answer.endswith(b'END\r\n'):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError('memcached closed the connection')
                answer += chunk
        return {parts[1]: parts[2] for parts in (line.split(' ', 2) for line in
                answer.decode().splitlines()) if len(parts) == 3 and parts[0] == 'STAT'}

    def rss(self):
        """Resident memory of the engine process, bytes."""
        with open(f'/proc/{self.pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
        return 0


class NodeMount:
    """A cachefs mount of a node; its daemon runs in the node's network namespace."""

    def __init__(self, node, path, pid, cache_dir, log_file):
        self.node, self.path, self.pid = node, Path(path), pid
        self.cache_dir, self.log_file = Path(cache_dir), Path(log_file)

    def stats(self):
        return json.loads(os.getxattr(self.path, 'user.cachefs.stats'))

    def mounted(self):
        path = os.path.abspath(self.path)
        with open('/proc/self/mountinfo') as f:
            return any(line.split()[4] == path for line in f)

    def unmount(self, timeout=15):
        if self.mounted():
            subprocess.run([sys.executable, '-m', 'cachefs', 'umount', str(self.path),
                            '--timeout', str(timeout)], capture_output=True, timeout=timeout + 30)
        if self.mounted():
            subprocess.run(['fusermount3', '-u', '-z', str(self.path)], check=False,
                           capture_output=True)
        deadline = time.monotonic() + 10
        while process_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


class Node:
    def __init__(self, rig, index, ip):
        self.rig, self.index, self.ip = rig, index, str(ip)
        self.name = f'{rig.prefix}-n{index}'          # the namespace
        self.host_link = f'{rig.prefix}-h{index}'     # the veth end on the bridge
        self.folder = rig.workdir / f'node{index}'
        self.engines = {}                              # name -> Engine
        self.mounts = []

    def command(self, argv):
        """`argv` run in this node's network namespace (and no other namespace of its own)."""
        return ['nsenter', f'--net=/run/netns/{self.name}', '--', *map(str, argv)]

    def run(self, argv, **kwargs):
        kwargs.setdefault('capture_output', True)
        kwargs.setdefault('text', True)
        kwargs.setdefault('timeout', 120)
        return subprocess.run(self.command(argv), **kwargs)

    def start_engine(self, name, argv, port, timeout=10.0):
        engine = Engine(self, name, argv, port, self.rig.log_dir / f'{self.name}-{name}.out')
        self.engines[name] = engine
        return engine.start(timeout)

    def start_memcached(self, memory='64M', disk='256M', item_max='8m', port=MEMCACHED_PORT,
                        extstore=None, threads=4, connections=1024):
        """This node's memcached with an extstore file of `disk` bytes in its folder."""
        options = dict(EXTSTORE_OPTIONS, **(extstore or {}))
        ext = ','.join(f'{k}={v}' for k, v in options.items())
        ext_file = self.folder / 'extstore'
        ext_file.unlink(missing_ok=True)
        argv = ['memcached', '-u', 'root', '-l', self.ip, '-p', port, '-U', '0',
                '-m', _megabytes(memory), '-I', item_max, '-t', threads, '-c', connections,
                '-o', f'{ext},ext_path={ext_file}:{_megabytes(disk)}M']
        return self.start_engine('memcached', argv, port)

    @property
    def memcached(self):
        return self.engines['memcached']

    def mount(self, url, *args, env, name='mnt', block_size=None, cache_size=None,
              memory_cache_size=None, log_level='debug'):
        """`cachefs mount url` on a folder of this node, its daemon in the node's namespace."""
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        cache_dir = self.folder / f'{name}-cache'
        log_file = self.rig.log_dir / f'{self.name}-{name}.log'
        argv = [sys.executable, '-m', 'cachefs', 'mount', url, path, '--cache-dir', cache_dir,
                '--log-file', log_file, '--log-level', log_level]
        for option, value in (('--block-size', block_size), ('--cache-size', cache_size),
                              ('--memory-cache-size', memory_cache_size)):
            if value is not None:
                argv += [option, value]
        result = self.run(argv + list(args), env=env)
        if result.returncode != 0:
            raise RuntimeError(f'mount on {self.name} failed ({result.returncode}): '
                               f'{result.stderr.strip()}')
        mounted = NodeMount(self, path, int(os.getxattr(path, 'user.cachefs.pid')), cache_dir,
                            log_file)
        self.mounts.append(mounted)
        return mounted

    def close(self):
        for mounted in self.mounts:
            try:
                mounted.unmount()
            except Exception:        # noqa: BLE001  everything else must still be undone
                log.exception('unmounting %s', mounted.path)
        for engine in self.engines.values():
            engine.stop()


def _megabytes(size):
    """'64M', '1G', 512 (MiB) or a byte count >= 1 MiB -> MiB as int."""
    if isinstance(size, int):
        return size if size < (1 << 20) else size >> 20
    text = str(size).strip().upper()
    scale = {'K': 1 / 1024, 'M': 1, 'G': 1024, 'T': 1 << 20}.get(text[-1:])
    return int(float(text[:-1]) * scale) if scale else int(text) >> 20


class ClusterRig:
    """`nodes` network namespaces on a bridge; see the module docstring."""

    def __init__(self, workdir, nodes=3, log_dir=None, seed=None):
        rng = random.Random(seed if seed is not None else uuid.uuid4().int)
        self.prefix = f'{NAME_PREFIX}{rng.getrandbits(24):06x}'
        self.workdir = Path(workdir) / self.prefix
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.subnet = free_subnet(rng)
        hosts = list(self.subnet.hosts())
        self.bridge_ip = str(hosts[0])
        self.bridge = f'{self.prefix}-br'
        self.nodes = [Node(self, i, hosts[10 + i]) for i in range(nodes)]
        self.proxies = []
        self._state = STATE_DIR / f'{self.prefix}.json'
        self._started = False

    def start(self):
        sweep_stale()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state.write_text(json.dumps({'owner': os.getpid()}))
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        prefixlen = self.subnet.prefixlen
        _ip('link', 'add', self.bridge, 'type', 'bridge')
        _ip('addr', 'add', f'{self.bridge_ip}/{prefixlen}', 'dev', self.bridge)
        _ip('link', 'set', self.bridge, 'up')
        for node in self.nodes:
            node.folder.mkdir(parents=True, exist_ok=True)
            _ip('netns', 'add', node.name)
            _ip('link', 'add', node.host_link, 'type', 'veth', 'peer', 'name', 'eth0',
                'netns', node.name)
            _ip('link', 'set', node.host_link, 'master', self.bridge, 'up')
            _ip('-n', node.name, 'addr', 'add', f'{node.ip}/{prefixlen}', 'dev', 'eth0')
            _ip('-n', node.name, 'link', 'set', 'eth0', 'up')
            _ip('-n', node.name, 'link', 'set', 'lo', 'up')
        return self

    def store_proxy(self, upstream_port, upstream_host='127.0.0.1', proxy_class=None, host=None):
        """A counting proxy on the bridge address (or `host`, an address of the bridge) in
        front of a store of the root namespace."""
        proxy = (proxy_class or CountingProxy)(upstream_host, upstream_port,
                                               host=host or self.bridge_ip).start()
        self.proxies.append(proxy)
        return proxy

    def engine_addresses(self, name='memcached'):
        return [node.engines[name].address for node in self.nodes if name in node.engines]

    def cluster_url(self, name='memcached'):
        return f'{name}://' + ','.join(self.engine_addresses(name))

    def isolate(self, node):
        """Cut `node` off the bridge (its engine then times out instead of refusing)."""
        _ip('link', 'set', node.host_link, 'down')

    def reconnect(self, node):
        _ip('link', 'set', node.host_link, 'up')

    def leftovers(self):
        """What of this rig still exists: namespaces, links, live processes (empty when closed)."""
        found = [n for n in netns_list() if n.startswith(self.prefix)]
        found += [n for n in link_list() if n.startswith(self.prefix)]
        for node in self.nodes:
            found += [f'{node.name}:{e.name}:{e.pid}' for e in node.engines.values()
                      if e.pid and process_alive(e.pid)]
            found += [f'{m.path}:{m.pid}' for m in node.mounts
                      if process_alive(m.pid) or m.mounted()]
        return found

    def close(self):
        if not self._started:
            return
        for node in self.nodes:
            node.close()
        for proxy in self.proxies:
            proxy.stop()
        for node in self.nodes:
            # the veth pair goes with its host end at once; with the namespace only later, in
            # the kernel's own time
            _ip('link', 'del', node.host_link, check=False)
            _ip('netns', 'del', node.name, check=False)
        _ip('link', 'del', self.bridge, check=False)
        self._state.unlink(missing_ok=True)
        self._started = False

    def remove_files(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
