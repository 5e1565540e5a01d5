"""Mount options: one table that feeds `--long-options`, fstab-style `-o name=value` and docs.

Every option has a long form; `-o cache_size=100G,allow_other` is rewritten into the same long
options before argparse sees it, so both spellings are checked and converted by the same code.
Generic mount(8) options that mean nothing to cachefs (ro, noauto, _netdev, x-systemd.*) are
accepted and ignored so that /etc/fstab lines and systemd .mount units work.

Values may also come from `CACHEFS_*` environment variables, a config file and a profile;
`configfile.py` merges those layers below the command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import EXIT_USAGE, UserError
from .units import parse_duration, parse_size

if TYPE_CHECKING:
    from .cache.disk import DiskTier

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return '/var/cache/cachefs'
    base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    return os.path.join(base, 'cachefs')


def machine_memory() -> int:
    """Bytes of RAM of this machine: no memory budget can exceed it."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
        return 1 << 50


# Checks of a converted value: each raises ValueError (with no message: the option's `limits`
# then says what is allowed; with a message: that message alone).

def _between(low, high, above=False):
    """low <= value <= high; with `above`, low < value."""
    def check(value):
        if not low <= value <= high or (above and value == low):     # NaN is refused too
            raise ValueError()
    return check


def _power_of_two_between(low, high):
    def check(value):
        if not low <= value <= high or value & (value - 1):
            raise ValueError()
    return check


def _at_most_memory(value):
    if not 0 <= value <= machine_memory():
        raise ValueError()


def _percent_or_size(value):
    if isinstance(value, str) and not 0 <= float(value[:-1]) <= 100:
        raise ValueError()


def _not_empty(value):
    if not value.strip():
        raise ValueError()


def _one_word(value):
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError()


def _endpoint(value):
    from .ufs import endpoint_problem
    problem = endpoint_problem(value)
    if problem:
        raise ValueError(problem)       # never the value itself: it may hold credentials


def _cluster_url(value):
    from .cache.cluster_peers import parse_cluster_url
    parse_cluster_url(value)        # raises ValueError with its one-line message


@dataclass(frozen=True)
class Option:
    name: str               # long option without dashes, e.g. 'cache-size'
    kind: str               # 'str', 'int', 'size', 'size_or_percent', 'ratio', 'duration',
                            # 'address', 'flag' or 'choice'
    default: object
    help: str
    choices: tuple = ()
    limits: str = ''        # the values allowed, in words (help, errors, README)
    check: Callable[[Any], None] | None = None    # None, or raises ValueError (see above)


MAX_ID = 2 ** 32 - 2        # uid/gid: (uid_t)-1 means "unchanged" to the kernel

MOUNT_OPTIONS = (
    Option('cache-dir', 'str', None,
           'cache folder (one subfolder per source; default /var/cache/cachefs as root, '
           '~/.cache/cachefs otherwise)', limits='a folder path', check=_not_empty),
    Option('endpoint-url', 'str', None,
           'S3 or OSS endpoint, e.g. http://127.0.0.1:8333 or oss-cn-hangzhou.aliyuncs.com '
           '(S3 also reads AWS_ENDPOINT_URL, OSS reads OSS_ENDPOINT)',
           limits='an http:// or https:// URL; for OSS also a bare host', check=_endpoint),
    Option('region', 'str', None, 'S3 region (default: from the AWS configuration)',
           limits='one word, no spaces', check=_one_word),
    Option('path-style', 'flag', False, 'path-style addressing (http://host/bucket/key)'),
    Option('no-sign-request', 'flag', False, 'anonymous access to a public S3 bucket'),
    Option('block-size', 'size', 4 * MiB, 'cache block size, the unit of store reads',
           limits='a power of two from 64K to 64M',
           check=_power_of_two_between(64 * KiB, 64 * MiB)),
    Option('memory-cache-size', 'size', 1 * GiB, 'memory tier capacity',
           limits="0 to the machine's memory", check=_at_most_memory),
    Option('cache-size', 'size_or_percent', '80%',
           'SSD tier capacity, bytes or a percentage of the cache disk (0 turns the tier off)',
           limits='0 or more bytes, or 0% to 100%', check=_percent_or_size),
    Option('free-space-ratio', 'ratio', 0.1,
           'free space always left on the cache disk, even when other programs fill it',
           limits='0 to 0.99 (or 0% to 99%)', check=_between(0, 0.99)),
    Option('eviction', 'choice', 'lru',
           'SSD tier policy when full: lru, or none (fill once, then stop admitting; best when '
           'the dataset is larger than the cache), or auto (none when the SSD tier is smaller '
           'than the dataset, else lru)', ('lru', 'none', 'auto')),
    Option('prefetch-window', 'size', 32 * MiB,
           'largest read-ahead per sequentially read file (0 turns prefetch off)',
           limits='0 to 1G', check=_between(0, GiB)),
    Option('prefetch-memory', 'size', 512 * MiB,
           'prefetch bytes in flight, for all readers together',
           limits="0 to the machine's memory", check=_at_most_memory),
    Option('metadata-ttl', 'duration', 24 * 3600.0,
           'age after which the saved listing is refreshed from the store ("inf": never)',
           limits='0 or more, or inf', check=_between(0, math.inf)),
    Option('entry-timeout', 'duration', 7200.0, 'how long the kernel caches name lookups',
           limits='0 to 365d', check=_between(0, 365 * 86400)),
    Option('attr-timeout', 'duration', 7200.0, 'how long the kernel caches file attributes',
           limits='0 to 365d', check=_between(0, 365 * 86400)),
    Option('max-idle-threads', 'int', 128,
           'FUSE requests served concurrently (pyfuse3 max_tasks; libfuse max_idle_threads)',
           limits='1 to 10000', check=_between(1, 10000)),
    Option('store-concurrency', 'int', 32, 'store requests in flight (worker threads)',
           limits='1 to 1024', check=_between(1, 1024)),
    Option('request-timeout', 'duration', 30.0, 'timeout of one store request',
           limits='more than 0, at most 1h', check=_between(0, 3600, above=True)),
    Option('retry-timeout', 'duration', 60.0,
           'total time a failing store read is retried before the read fails with EIO',
           limits='more than 0, at most 1d', check=_between(0, 86400, above=True)),
    Option('read-ahead', 'size', 4 * MiB,
           "kernel readahead of the mount (as root; 4M makes the kernel send 1 MiB reads)",
           limits='0 to 1G', check=_between(0, GiB)),
    Option('max-background', 'int', 64,
           'FUSE background requests the kernel keeps in flight (as root)',
           limits='1 to 65535', check=_between(1, 65535)),
    Option('allow-other', 'flag', False, 'let other users read the mount'),
    Option('uid', 'int', None, 'owner of every file (default: the daemon user)',
           limits=f'0 to {MAX_ID}', check=_between(0, MAX_ID)),
    Option('gid', 'int', None, 'group of every file (default: the daemon group)',
           limits=f'0 to {MAX_ID}', check=_between(0, MAX_ID)),
    Option('log-file', 'str', None, 'log to this file instead of stderr',
           limits='a file in an existing folder', check=_not_empty),
    Option('log-level', 'choice', 'info', 'log verbosity',
           ('debug', 'info', 'warning', 'error')),
    Option('metrics-addr', 'address', None,
           'serve Prometheus metrics on HOST:PORT at /metrics (default: off)',
           limits='HOST:PORT, port 1 to 65535'),
    Option('cluster', 'str', None,
           'the cluster tier: blocks missing from this node are asked of the memcached peer '
           'that holds them, and stored there once read from the store (default: off)',
           limits='memcached://HOST[:PORT][,HOST[:PORT]...]: one name that resolves to every '
           'node, or a list', check=_cluster_url),
    Option('cluster-timeout', 'duration', 0.5,
           'longest wait for one block from a cluster peer; then the block is read from the '
           'store and the peer skipped for a while',
           limits='more than 0, at most 60s', check=_between(0, 60, above=True)),
    Option('cluster-connect-timeout', 'duration', 0.1,
           'longest wait for a new connection to a cluster peer',
           limits='more than 0, at most 10s', check=_between(0, 10, above=True)),
    Option('cluster-secret-file', 'str', None,
           'file holding a secret shared by every node of the cluster: blocks carry a keyed '
           'checksum that nobody without it can forge (without it the checksum only catches '
           'corruption)', limits='a readable file of at least 16 bytes', check=_not_empty),
    Option('cluster-refresh', 'duration', 30.0,
           'how often the cluster host names are resolved again',
           limits='1s to 1d', check=_between(1, 86400)),
    Option('cluster-fill-queue', 'int', 16,
           'blocks read from the store waiting to be stored in the cluster; more are dropped, '
           'never waited for (0: this node never stores blocks in the cluster)',
           limits='0 to 4096', check=_between(0, 4096)),
    Option('profile', 'str', None,
           'a set of defaults for a kind of work: "training" (epoch reads of immutable data: '
           '24h kernel timeouts, listing kept until refresh, eviction auto, prefetch on)',
           limits='training, or a profile of the config file'),
    Option('config', 'str', None,
           'config file (default: ~/.config/cachefs/config.toml for non-root users, else '
           '/etc/cachefs/config.toml, when it exists)', limits='an existing file'),
)

# How a flag is written in -o, the environment and the config file (`-o allow_other=false`).
FLAG_TRUE = frozenset({'1', 'true', 'yes', 'on'})
FLAG_FALSE = frozenset({'0', 'false', 'no', 'off', ''})

# mount(8)/fstab options that carry no meaning for cachefs.
IGNORED_MOUNT_OPTIONS = {'ro', 'rw', 'defaults', 'auto', 'noauto', 'user', 'nouser', 'users',
                         'dev', 'nodev', 'suid', 'nosuid', 'exec', 'noexec', '_netdev', 'nofail',
                         'atime', 'noatime', 'relatime', 'norelatime', 'strictatime', 'sync',
                         'async', 'owner', 'group', 'comment'}


def _parse(option, text):
    """Text -> the option's value, without its range check; ValueError with a message."""
    if option.kind == 'size':
        return parse_size(text)
    if option.kind == 'duration':
        return parse_duration(text)
    if option.kind == 'int':
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'not a whole number: {text!r}') from None
    if option.kind == 'ratio':
        try:
            return float(text.rstrip('%')) / (100 if text.endswith('%') else 1)
        except ValueError:
            raise ValueError(f'not a ratio: {text!r} (examples: 0.1, 10%)') from None
    if option.kind == 'address':
        parse_address(text)
        return text
    if option.kind == 'size_or_percent':
        if str(text).endswith('%'):
            try:
                float(text[:-1])
            except ValueError:
                raise ValueError(f'not a percentage: {text!r} (examples: 80%, 100G)') from None
            return text
        return parse_size(text)
    return text


def converter(option: Option) -> Callable[[str], Any]:
    """The argparse `type` of an option: parse, then check the value against its range."""
    def convert(text: str) -> Any:
        try:
            value = _parse(option, text)
            if option.check is not None:
                option.check(value)
            return value
        except ValueError as exc:
            message = str(exc) or f'{text!r} is out of range: {option.limits}'
            raise argparse.ArgumentTypeError(message) from None
    convert.__name__ = option.kind     # argparse names the type in its messages
    return convert


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9100' -> ('127.0.0.1', 9100); '[::1]:9100' and ':9100' (every address) too."""
    host, sep, port = str(text).strip().rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'not HOST:PORT: {text!r} (example: 127.0.0.1:9100)')
    host = host.removeprefix('[').removesuffix(']')
    return host or '0.0.0.0', int(port)


def resolve_auto_eviction(options: argparse.Namespace, disk: DiskTier | None,
                          dataset_bytes: int) -> None:
    """`--eviction auto`: once the dataset size is known, `none` when the SSD tier cannot hold
    the whole dataset (every epoch then hits the same cached part, without SSD churn), else
    `lru`. Sets the policy on the options (reported by stats) and on the tier."""
    if options.eviction != 'auto':
        return
    capacity = disk.capacity if disk is not None else 0
    options.eviction = 'none' if disk is not None and capacity < dataset_bytes else 'lru'
    if disk is not None:
        disk.eviction = options.eviction
    log.info('eviction auto: SSD tier of %d bytes, dataset of %d bytes: %s', capacity,
             dataset_bytes, options.eviction)


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    for option in MOUNT_OPTIONS:
        flag = '--' + option.name
        if option.kind == 'flag':
            parser.add_argument(flag, action='store_true', default=option.default, help=option.help)
        elif option.kind == 'choice':
            parser.add_argument(flag, choices=option.choices, default=option.default,
                                help=f'{option.help} (default: {option.default})')
        else:
            shown = '; '.join(filter(None, [option.limits, '' if option.default is None
                                            else f'default: {option.default}']))
            # argparse expands %-formats in help: '80%' must be written '80%%'
            parser.add_argument(flag, type=converter(option), default=option.default,
                                metavar=option.kind.upper(),
                                help=f'{option.help} ({shown})'.replace('%', '%%'))


def expand_dash_o(argv: list[str]) -> list[str]:
    """Rewrite `-o a=b,c` (and `-oa=b`) into `--a=b --c`; drop generic mount(8) options.

    A value is joined to its option (`--region=-x`), so that one starting with '-' is not taken
    for an option. A flag may be given a value: `allow_other=true` sets it, `=false` leaves it
    off."""
    known = {option.name: option for option in MOUNT_OPTIONS}
    extra = {'foreground': None}
    result: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == '-o' or (arg.startswith('-o') and not arg.startswith('--')):
            value = arg[2:] or next(args, None)
            if value is None:
                raise UserError('-o needs a value, e.g. -o memory_cache_size=2G', EXIT_USAGE)
            cluster_at = None       # index in `result` of a cluster= in this -o
            for item in filter(None, value.split(',')):
                name, has_value, setting = item.partition('=')
                name = name.strip()
                if name in IGNORED_MOUNT_OPTIONS or name.startswith('x-'):
                    continue
                name = name.replace('_', '-')
                option = known.get(name)
                if option is None and not has_value and cluster_at is not None \
                        and name not in extra:
                    # `cluster=memcached://a:11211,b:11211`: the URL's commas are -o's too;
                    # what follows it and is no option is its next host
                    result[cluster_at] += ',' + item.strip()
                    continue
                cluster_at = len(result) if name == 'cluster' and has_value else None
                if option is None and name not in extra:
                    raise UserError(f'unknown mount option {item!r} in -o', EXIT_USAGE)
                if option is None or option.kind == 'flag':
                    if has_value and setting.strip().lower() not in FLAG_TRUE | FLAG_FALSE:
                        raise UserError(f'mount option {name!r} takes true or false, not '
                                        f'{setting!r}', EXIT_USAGE)
                    if not has_value or setting.strip().lower() in FLAG_TRUE:
                        result.append('--' + name)
                    continue
                if not has_value:
                    raise UserError(f'mount option {name!r} needs a value ({name}=...)',
                                    EXIT_USAGE)
                result.append(f'--{name}={setting}')
        else:
            result.append(arg)
    return result
