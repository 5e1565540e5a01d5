"""Mount options: one table that feeds `--long-options`, fstab-style `-o name=value` and docs.

Every option has a long form; `-o cache_size=100G,allow_other` is rewritten into the same long
options before argparse sees it, so both spellings are checked and converted by the same code.
Generic mount(8) options that mean nothing to cachefs (ro, noauto, _netdev, x-systemd.*) are
accepted and ignored so that /etc/fstab lines and systemd .mount units work.

Values may also come from `CACHEFS_*` environment variables, a config file and a profile;
`configfile.py` merges those layers below the command line.
"""

import argparse
import logging
import os
from dataclasses import dataclass

from .errors import EXIT_USAGE, UserError
from .units import parse_duration, parse_size

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30


def default_cache_dir():
    if os.geteuid() == 0:
        return '/var/cache/cachefs'
    base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    return os.path.join(base, 'cachefs')


@dataclass(frozen=True)
class Option:
    name: str               # long option without dashes, e.g. 'cache-size'
    kind: str               # 'str', 'int', 'size', 'size_or_percent', 'ratio', 'duration',
                            # 'address', 'flag' or 'choice'
    default: object
    help: str
    choices: tuple = ()


MOUNT_OPTIONS = (
    Option('cache-dir', 'str', None,
           'cache folder (one subfolder per source; default /var/cache/cachefs as root, '
           '~/.cache/cachefs otherwise)'),
    Option('endpoint-url', 'str', None,
           'S3 or OSS endpoint, e.g. http://127.0.0.1:8333 or oss-cn-hangzhou.aliyuncs.com '
           '(S3 also reads AWS_ENDPOINT_URL, OSS reads OSS_ENDPOINT)'),
    Option('region', 'str', None, 'S3 region (default: from the AWS configuration)'),
    Option('path-style', 'flag', False, 'path-style addressing (http://host/bucket/key)'),
    Option('no-sign-request', 'flag', False, 'anonymous access to a public S3 bucket'),
    Option('block-size', 'size', 4 * MiB, 'cache block size, the unit of store reads'),
    Option('memory-cache-size', 'size', 1 * GiB, 'memory tier capacity'),
    Option('cache-size', 'size_or_percent', '80%',
           'SSD tier capacity, bytes or a percentage of the cache disk (0 turns the tier off)'),
    Option('free-space-ratio', 'ratio', 0.1,
           'free space always left on the cache disk, even when other programs fill it'),
    Option('eviction', 'choice', 'lru',
           'SSD tier policy when full: lru, or none (fill once, then stop admitting; best when '
           'the dataset is larger than the cache), or auto (none when the SSD tier is smaller '
           'than the dataset, else lru)', ('lru', 'none', 'auto')),
    Option('prefetch-window', 'size', 32 * MiB,
           'largest read-ahead per sequentially read file (0 turns prefetch off)'),
    Option('prefetch-memory', 'size', 512 * MiB,
           'prefetch bytes in flight, for all readers together'),
    Option('metadata-ttl', 'duration', 24 * 3600.0,
           'age after which the saved listing is refreshed from the store ("inf": never)'),
    Option('entry-timeout', 'duration', 7200.0, 'how long the kernel caches name lookups'),
    Option('attr-timeout', 'duration', 7200.0, 'how long the kernel caches file attributes'),
    Option('max-idle-threads', 'int', 128,
           'FUSE requests served concurrently (pyfuse3 max_tasks; libfuse max_idle_threads)'),
    Option('store-concurrency', 'int', 32, 'store requests in flight (worker threads)'),
    Option('request-timeout', 'duration', 30.0, 'timeout of one store request'),
    Option('retry-timeout', 'duration', 60.0,
           'total time a failing store read is retried before the read fails with EIO'),
    Option('read-ahead', 'size', 4 * MiB,
           "kernel readahead of the mount (as root; 4M makes the kernel send 1 MiB reads)"),
    Option('max-background', 'int', 64,
           'FUSE background requests the kernel keeps in flight (as root)'),
    Option('allow-other', 'flag', False, 'let other users read the mount'),
    Option('uid', 'int', None, 'owner of every file (default: the daemon user)'),
    Option('gid', 'int', None, 'group of every file (default: the daemon group)'),
    Option('log-file', 'str', None, 'log to this file instead of stderr'),
    Option('log-level', 'choice', 'info', 'log verbosity',
           ('debug', 'info', 'warning', 'error')),
    Option('metrics-addr', 'address', None,
           'serve Prometheus metrics on HOST:PORT at /metrics (default: off)'),
    Option('profile', 'str', None,
           'a set of defaults for a kind of work: "training" (epoch reads of immutable data: '
           '24h kernel timeouts, listing kept until refresh, eviction auto, prefetch on)'),
    Option('config', 'str', None,
           'config file (default: ~/.config/cachefs/config.toml for non-root users, else '
           '/etc/cachefs/config.toml, when it exists)'),
)

# mount(8)/fstab options that carry no meaning for cachefs.
IGNORED_MOUNT_OPTIONS = {'ro', 'rw', 'defaults', 'auto', 'noauto', 'user', 'nouser', 'users',
                         'dev', 'nodev', 'suid', 'nosuid', 'exec', 'noexec', '_netdev', 'nofail',
                         'atime', 'noatime', 'relatime', 'norelatime', 'strictatime', 'sync',
                         'async', 'owner', 'group', 'comment'}


def converter(option):
    def convert(text):
        try:
            if option.kind == 'size':
                return parse_size(text)
            if option.kind == 'duration':
                return parse_duration(text)
            if option.kind == 'int':
                return int(text)
            if option.kind == 'ratio':
                value = float(text.rstrip('%')) / (100 if text.endswith('%') else 1)
                if not 0 <= value < 1:
                    raise ValueError(f'{text!r} is not a ratio between 0 and 1 (or 0% and 99%)')
                return value
            if option.kind == 'address':
                parse_address(text)
                return text
            if option.kind == 'size_or_percent':
                return text if str(text).endswith('%') and float(text[:-1]) <= 100 else parse_size(text)
            return text
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = option.kind     # argparse names the type in its messages
    return convert


def parse_address(text):
    """'127.0.0.1:9100' -> ('127.0.0.1', 9100); '[::1]:9100' and ':9100' (every address) too."""
    host, sep, port = str(text).strip().rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'not HOST:PORT: {text!r} (example: 127.0.0.1:9100)')
    host = host.removeprefix('[').removesuffix(']')
    return host or '0.0.0.0', int(port)


def resolve_auto_eviction(options, disk, dataset_bytes):
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


def add_mount_options(parser):
    for option in MOUNT_OPTIONS:
        flag = '--' + option.name
        if option.kind == 'flag':
            parser.add_argument(flag, action='store_true', default=option.default, help=option.help)
        elif option.kind == 'choice':
            parser.add_argument(flag, choices=option.choices, default=option.default,
                                help=f'{option.help} (default: {option.default})')
        else:
            shown = '' if option.default is None else f' (default: {option.default})'
            # argparse expands %-formats in help: '80%' must be written '80%%'
            parser.add_argument(flag, type=converter(option), default=option.default,
                                metavar=option.kind.upper(),
                                help=(option.help + shown).replace('%', '%%'))


def expand_dash_o(argv):
    """Rewrite `-o a=b,c` (and `-oa=b`) into `--a b --c`; drop generic mount(8) options."""
    known = {option.name: option for option in MOUNT_OPTIONS}
    extra = {'foreground': None}
    result = []
    args = iter(argv)
    for arg in args:
        if arg == '-o' or (arg.startswith('-o') and not arg.startswith('--')):
            value = arg[2:] or next(args, None)
            if value is None:
                raise UserError('-o needs a value, e.g. -o memory_cache_size=2G', EXIT_USAGE)
            for item in filter(None, value.split(',')):
                name, has_value, setting = item.partition('=')
                name = name.strip()
                if name in IGNORED_MOUNT_OPTIONS or name.startswith('x-'):
                    continue
                name = name.replace('_', '-')
                option = known.get(name)
                if option is None and name not in extra:
                    raise UserError(f'unknown mount option {item!r} in -o', EXIT_USAGE)
                result.append('--' + name)
                if option is not None and option.kind != 'flag':
                    if not has_value:
                        raise UserError(f'mount option {name!r} needs a value ({name}=...)',
                                        EXIT_USAGE)
                    result.append(setting)
        else:
            result.append(arg)
    return result
