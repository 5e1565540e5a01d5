"""The daemon's memory: what each option adds (the formula), the memory limit of the daemon's
cgroup, and the sizing that keeps the first under the second, so that a pod or a systemd unit
never OOM-kills the daemon (every read of the training job would then fail with ENOTCONN).

The formula, in bytes (README, "Memory"; each term is a bound, not an average):

    --memory-cache-size                      the memory tier's blocks and the free block
                                             buffers kept for reuse (up to 8 blocks, kept
                                             within it: cache/memory.py)
  + --prefetch-memory                        (0 when --prefetch-window is 0)
  + 8 x --block-size                         the SSD write queue's own blocks (none without an
                                             SSD tier); beyond those it is charged to the
                                             memory tier (cache/blocks.py)
  + --store-concurrency x --block-size       a buffer per store request in flight
  + --max-idle-threads x 1 MiB               the reply of each FUSE read in flight
  + files x 1,200                            the tree and the listing, twice during a refresh
  + (--cluster-fill-queue + 4) x --block-size
                                             with --cluster: blocks queued for the cluster and
                                             the 4 being sent (cache/cluster.py)
  + 60 MiB                                   the interpreter, its libraries, the event loop

The limit: cgroup v2 `memory.max` and cgroup v1 `memory.limit_in_bytes` (hybrid machines keep the
memory controller on v1) of the daemon's own cgroup and of every ancestor up to the mount of the
hierarchy; the smallest counts. No cgroup, or no limit: nothing is sized.

The sizing: the formula must stay within HEADROOM (75%) of the limit, because the terms are
estimates, freed memory is not always returned to the kernel, and the cgroup also charges the
page cache of the daemon's files. The defaulted options are lowered, the memory tier first, then
the prefetch memory, never below their floors, and one log line says so. When the options the
user gave (command line, -o, environment, config file) leave no way to fit, the mount is refused
with one line (exit 2), before anything is listed or mounted.

Known limits: the formula does not know what else runs in the same cgroup (a training job that
shares the daemon's container shares its limit: give smaller options); cgroup v1's
`use_hierarchy=0` (ancestors' limits not enforced) is treated as 1 (the stricter reading).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from .cache.writeback import _MIN_QUEUED_BLOCKS
from .errors import EXIT_USAGE, UserError
from .units import format_size

log = logging.getLogger(__name__)

MiB = 1 << 20

HEADROOM = 0.75                 # the formula may use this share of the limit
BASE_BYTES = 60 * MiB           # interpreter, boto3, pyfuse3, trio: 57 MiB idle with a tiny tree
FUSE_REPLY_BYTES = 1 * MiB      # the largest read the kernel sends (with --read-ahead >= 1M)
WRITE_QUEUE_BLOCKS = _MIN_QUEUED_BLOCKS
# The tree and the listing per file, at their peak: a refresh holds the old tree, the new listing
# and the new tree at once. Measured on a daemon with 1,281,167 ImageNet-style keys (compact tree,
# listing turned into columns): peak RSS 927 MiB at the first mount, 1,240-1,283 MiB during
# refreshes, i.e. up to 1,001 bytes per file over BASE_BYTES (RSS; the allocator keeps what was
# freed: RSS stays at 1.13-1.16 GiB after a refresh, flat over three); about 20% headroom.
TREE_BYTES_PER_FILE = 1200
# Floors, in blocks: below these the tiers stop doing their job.
MEMORY_CACHE_FLOOR_BLOCKS = 16
PREFETCH_FLOOR_BLOCKS = 8
# Values at or above this in memory.limit_in_bytes mean "no limit" (v1 writes the page-rounded
# LONG_MAX, 9223372036854771712).
_V1_UNLIMITED = 1 << 62

# the options that are sized down when the user did not give them, in that order
SIZED = ('memory-cache-size', 'prefetch-memory')


@dataclass(frozen=True)
class Formula:
    """The daemon's memory, term by term (bytes)."""
    memory_cache: int
    prefetch: int
    write_queue: int
    store_requests: int
    fuse_reads: int
    tree: int
    base: int
    cluster_fills: int = 0

    @property
    def total(self) -> int:
        return (self.memory_cache + self.prefetch + self.write_queue + self.store_requests
                + self.fuse_reads + self.tree + self.base + self.cluster_fills)

    def describe(self) -> str:
        terms: tuple[tuple[str, int], ...] = (
            ('memory tier', self.memory_cache), ('prefetch', self.prefetch),
            ('SSD write queue', self.write_queue), ('store requests', self.store_requests),
            ('FUSE reads', self.fuse_reads), ('tree', self.tree), ('interpreter', self.base))
        if self.cluster_fills:
            terms += (('cluster fills', self.cluster_fills),)
        return ' + '.join(f'{name} {format_size(value)}' for name, value in terms)


def formula(*, block_size: int, memory_cache_size: int, prefetch_memory: int,
            prefetch_window: int, ssd_tier: bool, store_concurrency: int,
            max_idle_threads: int, files: int, cluster_fill_blocks: int = 0) -> Formula:
    return Formula(
        memory_cache=memory_cache_size,
        prefetch=prefetch_memory if prefetch_window > 0 else 0,
        write_queue=WRITE_QUEUE_BLOCKS * block_size if ssd_tier else 0,
        store_requests=store_concurrency * block_size,
        fuse_reads=max_idle_threads * FUSE_REPLY_BYTES,
        tree=files * TREE_BYTES_PER_FILE,
        base=BASE_BYTES,
        cluster_fills=cluster_fill_blocks * block_size)


def formula_of(options: argparse.Namespace, files: int, ssd_tier: bool) -> Formula:
    """The formula of parsed mount options."""
    return formula(block_size=options.block_size, memory_cache_size=options.memory_cache_size,
                   prefetch_memory=options.prefetch_memory,
                   prefetch_window=options.prefetch_window, ssd_tier=ssd_tier,
                   store_concurrency=options.store_concurrency,
                   max_idle_threads=options.max_idle_threads, files=files,
                   cluster_fill_blocks=cluster_fill_blocks(options))


def cluster_fill_blocks(options: argparse.Namespace) -> int:
    """Blocks the cluster tier may hold for its fills: its queue and the blocks being sent."""
    if not getattr(options, 'cluster', None):
        return 0
    from .cache.cluster import _FILL_WORKERS    # the fills being sent, one block each
    return options.cluster_fill_queue + _FILL_WORKERS


def ssd_tier_requested(options: argparse.Namespace) -> bool:
    return options.cache_size not in (0, '0%')


# -- the limit --

@dataclass(frozen=True)
class Limit:
    bytes: int
    where: str          # 'cgroup v1 /sys/fs/cgroup/memory/.../memory.limit_in_bytes'

    def __str__(self) -> str:
        return f'{format_size(self.bytes)} ({self.where})'


@dataclass(frozen=True)
class _Hierarchy:
    version: str        # 'v1' or 'v2'
    root: str           # the cgroup path the mount shows at its mount point
    mountpoint: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    for code in ('040', '011', '012', '134'):
        field = field.replace('\\' + code, chr(int(code, 8)))
    return field


def _hierarchies(mountinfo_text: str) -> list[_Hierarchy]:
    """The cgroup2 mounts and the cgroup v1 mounts of the memory controller."""
    found = []
    for line in mountinfo_text.splitlines():
        before, sep, after = line.partition(' - ')
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, super_options = tail[0], tail[2].split(',')
        if fstype == 'cgroup2':
            version = 'v2'
        elif fstype == 'cgroup' and 'memory' in super_options:
            version = 'v1'
        else:
            continue
        found.append(_Hierarchy(version, _unescape(fields[3]), _unescape(fields[4])))
    return found


def _own_cgroups(cgroup_text: str) -> dict[str, str]:
    """{'v2': path of the `0::` line, 'v1': path of the line whose controllers hold memory}."""
    paths = {}
    for line in cgroup_text.splitlines():
        number, _, rest = line.partition(':')
        controllers, _, path = rest.partition(':')
        if number == '0' and controllers == '':
            paths['v2'] = path
        elif 'memory' in controllers.split(','):
            paths['v1'] = path
    return paths


def _folder_of(hierarchy: _Hierarchy, path: str) -> str | None:
    """The folder of cgroup `path` under the mount, or None when the mount does not show it."""
    root = hierarchy.root.rstrip('/')
    if root and path != root and not path.startswith(root + '/'):
        return None
    relative = path[len(root):].strip('/')
    return os.path.join(hierarchy.mountpoint, relative) if relative else hierarchy.mountpoint


def _read_limit(path: str, version: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if version == 'v2':
        return None if text == 'max' or not text.isdigit() else int(text)
    if not text.isdigit() or int(text) >= _V1_UNLIMITED:
        return None
    return int(text)


def cgroup_limit(cgroup_text: str, mountinfo_text: str) -> Limit | None:
    """The smallest memory limit over the process's cgroup (both versions) and its ancestors,
    given the texts of /proc/self/cgroup and /proc/self/mountinfo; None without a limit."""
    own = _own_cgroups(cgroup_text)
    best: Limit | None = None
    seen = set()
    for hierarchy in _hierarchies(mountinfo_text):
        path = own.get(hierarchy.version)
        if path is None or (hierarchy.version, path) in seen:
            continue
        folder = _folder_of(hierarchy, path)
        if folder is None or not os.path.isdir(folder):
            continue
        seen.add((hierarchy.version, path))
        name = 'memory.max' if hierarchy.version == 'v2' else 'memory.limit_in_bytes'
        top = os.path.normpath(hierarchy.mountpoint)
        folder = os.path.normpath(folder)
        while True:
            file = os.path.join(folder, name)
            limit = _read_limit(file, hierarchy.version)
            if limit is not None and (best is None or limit < best.bytes):
                best = Limit(limit, f'cgroup {hierarchy.version} {file}')
            if folder == top or os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    return best


def read_cgroup_limit(proc: str = '/proc') -> Limit | None:
    """The memory limit of this process's cgroup (cgroup_limit), or None."""
    try:
        with open(os.path.join(proc, 'self/cgroup')) as f:
            cgroup_text = f.read()
        with open(os.path.join(proc, 'self/mountinfo')) as f:
            mountinfo_text = f.read()
    except OSError:
        return None
    return cgroup_limit(cgroup_text, mountinfo_text)


# -- sizing --

@dataclass(frozen=True)
class Sizing:
    """What fits: the values of the sized options, and which of them were lowered."""
    memory_cache_size: int
    prefetch_memory: int
    formula: Formula
    lowered: tuple[str, ...]        # option names, in SIZED order


def _floor(name: str, block_size: int) -> int:
    blocks = MEMORY_CACHE_FLOOR_BLOCKS if name == 'memory-cache-size' else PREFETCH_FLOOR_BLOCKS
    return blocks * block_size


def size_to_limit(options: argparse.Namespace, files: int, ssd_tier: bool, limit: Limit | None,
                  explicit: Collection[str]) -> Sizing:
    """The option values that keep the formula within HEADROOM of `limit`: the defaulted options
    of SIZED lowered, in order, to no less than their floors (in whole blocks). Raises UserError
    (exit 2) when they cannot: options the user gave are never changed."""
    values = {'memory-cache-size': options.memory_cache_size,
              'prefetch-memory': options.prefetch_memory}
    current = formula_of(options, files, ssd_tier)
    if limit is None:
        return Sizing(values['memory-cache-size'], values['prefetch-memory'], current, ())
    allowed = int(limit.bytes * HEADROOM)
    excess = current.total - allowed
    lowered = []
    block = options.block_size
    for name in SIZED:
        if excess <= 0:
            break
        if name in explicit or (name == 'prefetch-memory' and options.prefetch_window <= 0):
            continue
        floor = min(values[name], _floor(name, block))
        wanted = max(floor, values[name] - excess)
        wanted = max(floor, wanted // block * block)
        if wanted < values[name]:
            excess -= values[name] - wanted
            values[name] = wanted
            lowered.append(name)
    sized = replace(current, memory_cache=values['memory-cache-size'],
                    prefetch=values['prefetch-memory'] if current.prefetch else 0)
    if excess > 0:
        raise UserError(refusal(sized, limit, explicit), EXIT_USAGE)
    return Sizing(values['memory-cache-size'], values['prefetch-memory'], sized, tuple(lowered))


# The options of the formula, for the refusal: what the user may lower.
_TERMS = ('memory-cache-size', 'prefetch-memory', 'block-size', 'store-concurrency',
          'max-idle-threads')


def refusal(sized: Formula, limit: Limit, explicit: Collection[str]) -> str:
    given = [name for name in _TERMS if name in explicit]
    cause = (f'the options given ({", ".join("--" + n for n in given)}) need'
             if given else 'even with the memory tier and prefetch memory at their floors, '
             'cachefs needs')
    return (f'memory limit {limit}: {cause} {format_size(sized.total)} ({sized.describe()}), '
            f'more than {HEADROOM:.0%} of the limit ({format_size(int(limit.bytes * HEADROOM))})'
            '; give smaller --memory-cache-size, --prefetch-memory, --store-concurrency, '
            '--max-idle-threads or --block-size, or raise the limit (README, "Memory")')


def explicit_options(options: argparse.Namespace) -> frozenset[str]:
    """The option names (dashes) the user gave: set by the CLI (cli.py); none when the options
    were built another way (tests, the demo)."""
    return frozenset(getattr(options, 'explicit', ()))


def fit(options: argparse.Namespace, files: int, ssd_tier: bool, limit: Limit | None,
        announce: Callable[[str], None] | None = log.info) -> Sizing:
    """Size the options to the limit in place (size_to_limit) and say so in one log line when
    something was lowered; `announce=None` only checks (raises UserError, changes nothing)."""
    sizing = size_to_limit(options, files, ssd_tier, limit, explicit_options(options))
    if announce is None or not sizing.lowered:
        return sizing
    before = {name: getattr(options, name.replace('-', '_')) for name in sizing.lowered}
    options.memory_cache_size = sizing.memory_cache_size
    options.prefetch_memory = sizing.prefetch_memory
    assert limit is not None
    announce(f'memory limit {limit}: sized down '
             + ', '.join(f'--{name} from {format_size(before[name])} to '
                         f'{format_size(getattr(options, name.replace("-", "_")))}'
                         for name in sizing.lowered)
             + f' so that the daemon\'s memory, {format_size(sizing.formula.total)} '
             f'({sizing.formula.describe()}), stays within {HEADROOM:.0%} of the limit')
    return sizing
