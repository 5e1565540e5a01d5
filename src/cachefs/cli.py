"""Command line: `cachefs mount|umount|refresh|stats|warmup|demo`, and the `mount.cachefs` helper.

`cachefs mount` without `--foreground` starts the daemon as a new process (never a fork inside a
running trio loop) and waits on a pipe until the daemon reports that the mount answers, or
reports the one-line error that stopped it; its exit status is the daemon's.

Mount options come from the command line, then `CACHEFS_*` variables, the config file and the
profile (`configfile.py`): those layers become argparse defaults before the command line is
parsed again, so an explicit flag always wins.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time

from . import __version__, control, mounts
from .config import add_mount_options, expand_dash_o
from .errors import EXIT_CODES, EXIT_INTERNAL, EXIT_OK, EXIT_STORE, EXIT_USAGE, UserError
from .logs import OneLineFormatter, one_line
from .units import format_size

log = logging.getLogger(__name__)

READY_FD_ENV = 'CACHEFS_READY_FD'
# The options the user gave, for the daemon process of a background mount (whose command line
# holds every option): internal, set by spawn_daemon only.
EXPLICIT_ENV = 'CACHEFS_EXPLICIT_OPTIONS'
SUBCOMMANDS = ('mount', 'umount', 'unmount', 'refresh', 'stats', 'warmup', 'demo')


class _Parser(argparse.ArgumentParser):
    """argparse that raises `UserError` instead of printing usage and exiting with 2."""

    mount_parser: argparse.ArgumentParser     # the top-level parser's `mount` command

    def error(self, message):
        raise UserError(f'{self.prog}: {message}', EXIT_USAGE)


def build_parser():
    epilog = 'exit codes:\n' + '\n'.join(f'  {code}  {text}' for code, text in EXIT_CODES.items())
    parser = _Parser(prog='cachefs', description='A read cache for training data on object '
                     'storage, mounted as a read-only POSIX folder.', epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'cachefs {__version__}')
    commands = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)

    mount = commands.add_parser('mount', help='mount a source (s3://, oss://, local folder)',
                                description='Mount SOURCE read-only on MOUNTPOINT. Every option '
                                'can also be given as -o name=value,... (fstab style).')
    mount.add_argument('source', help='s3://bucket[/prefix], oss://bucket[/prefix], '
                       'file:///path or a local path')
    mount.add_argument('mountpoint', help='an existing empty folder')
    mount.add_argument('-f', '--foreground', action='store_true',
                       help='stay attached (systemd, containers); unmount on SIGTERM/SIGINT')
    add_mount_options(mount)
    parser.mount_parser = mount

    for name in ('umount', 'unmount'):
        umount = commands.add_parser(name, help='unmount and wait for the daemon to exit')
        umount.add_argument('mountpoint')
        umount.add_argument('--timeout', type=float, default=60.0,
                            help='seconds to wait for the daemon to exit (default 60)')

    refresh = commands.add_parser('refresh', help='list the store again now and show changes '
                                  '(objects replaced, added or deleted) in the mount')
    refresh.add_argument('mountpoint')
    refresh.add_argument('--timeout', type=float, default=300.0,
                         help='seconds to wait for the new listing (default 300)')

    stats = commands.add_parser('stats', help="print a mount's counters")
    stats.add_argument('mountpoint')
    stats.add_argument('--json', action='store_true', help='machine-readable output')

    warmup = commands.add_parser(
        'warmup', help='load files or folders of a mount into its cache before training',
        description='Read PATHs (files or folders inside a cachefs mount) through the mount so '
        'that their blocks are cached, skipping files that are already fully cached (an '
        'interrupted warmup continues where it stopped). The kernel page cache is left alone.')
    warmup.add_argument('paths', nargs='+', metavar='PATH', help='a file or folder in a mount')
    warmup.add_argument('--threads', type=int, default=8,
                        help='files read at once (default 8)')
    warmup.add_argument('--check', action='store_true',
                        help='only report how much of PATH is cached; load nothing')
    warmup.add_argument('--json', action='store_true', help='machine-readable summary')

    demo = commands.add_parser('demo', help='the embedded default: a loopback SeaweedFS store '
                               'with generated TFRecord shards, mounted and read twice')
    demo.add_argument('--workdir', default=None, help='where the store, cache and mount live '
                      '(default: a temporary folder, removed at the end)')
    demo.add_argument('--shards', type=int, default=8, help='TFRecord shards (default 8)')
    demo.add_argument('--shard-size', default='64M', help='bytes per shard (default 64M)')
    return parser


def setup_logging(level='info', log_file=None):
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())     # one record, one line, whatever a key holds
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # boto and urllib3 are chatty at debug and log request details we do not want in our logs.
    for noisy in ('botocore', 'boto3', 'urllib3', 's3transfer', 'oss2', 'requests'):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # `cachefs SOURCE MOUNTPOINT -o ...` is how mount.fuse3 calls a FUSE file system.
    if argv and not argv[0].startswith('-') and argv[0] not in SUBCOMMANDS:
        argv.insert(0, 'mount')
    try:
        argv = expand_dash_o(argv)
        parser = build_parser()
        options = parser.parse_args(argv)
        if options.command == 'mount':
            options = apply_option_layers(parser, argv, options)
        return COMMANDS[options.command](options)
    except UserError as exc:
        print(f'cachefs: error: {one_line(exc)}', file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def apply_option_layers(parser, argv, options):
    """Parse the mount command line again over the environment, config file and profile.
    `options.explicit` names the options the user gave (memory_budget.py never lowers those)."""
    from .configfile import layered_defaults
    explicit: set[str] = set()
    defaults = layered_defaults(options.config, options.profile, explicit=explicit)
    if defaults:
        parser.mount_parser.set_defaults(**defaults)
        options = parser.parse_args(argv)
    inherited = os.environ.pop(EXPLICIT_ENV, None)
    if inherited is not None:
        options.explicit = frozenset(filter(None, inherited.split(',')))
    else:
        options.explicit = frozenset(explicit | given_on_command_line(parser, argv))
    return options


def given_on_command_line(parser, argv):
    """The mount options on the command line (after -o expansion), found by parsing it again
    into a namespace where every option is already set: argparse then fills in no default, so
    what changed was given, even when given with its default value."""
    from .config import MOUNT_OPTIONS
    unset = object()
    probe = argparse.Namespace(**{o.name.replace('-', '_'): unset for o in MOUNT_OPTIONS})
    parser.mount_parser.parse_args(argv[argv.index('mount') + 1:], namespace=probe)
    return {o.name for o in MOUNT_OPTIONS if getattr(probe, o.name.replace('-', '_')) is not unset}


# -- mount --

def command_mount(options):
    # Refuse credentials in URLs here, before they would reach the daemon's command line.
    from .ufs import check_endpoint, parse_source
    source = parse_source(options.source)
    check_endpoint(options.endpoint_url, scheme=source.scheme)
    variable = {'s3': 'AWS_ENDPOINT_URL', 'oss': 'OSS_ENDPOINT'}.get(source.scheme)
    if variable and not options.endpoint_url:
        check_endpoint(os.environ.get(variable), variable, source.scheme)
    if options.log_file:
        check_log_file(options.log_file)
    if options.foreground:
        return run_daemon(options)
    return spawn_daemon(options)


def check_log_file(path):
    """The log file can be opened for appending (its folder exists, it may be written)."""
    try:
        with open(path, 'ab'):
            pass
    except OSError as exc:
        raise UserError(f'--log-file {path}: {exc.strerror}', EXIT_USAGE) from None


def run_daemon(options):
    """The daemon itself (foreground mode, or the child of a background mount)."""
    from .daemon import Daemon
    ready_fd = int(os.environ.pop(READY_FD_ENV, -1))
    setup_logging(options.log_level, options.log_file)

    def report(line):
        if ready_fd >= 0:
            try:
                os.write(ready_fd, line.encode() + b'\n')
            except OSError:
                pass

    try:
        daemon = Daemon(options, on_ready=lambda: report('ready'))
        daemon.prepare()
        daemon.serve()
        return EXIT_OK
    except UserError as exc:
        report(f'error {exc.exit_code} {one_line(exc)}')
        if ready_fd >= 0 or options.log_file:
            log.error('%s', exc)
        if ready_fd < 0:        # in the foreground; stderr gets this one line, not a log line too
            print(f'cachefs: error: {one_line(exc)}', file=sys.stderr)
        return exc.exit_code
    except Exception:
        log.exception('the daemon failed')
        report(f'error {EXIT_INTERNAL} internal error; see the log')
        return EXIT_INTERNAL


def spawn_daemon(options):
    argv = [sys.executable, '-m', 'cachefs', 'mount', '--foreground'] + _argv_of(options)
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_end),
                              EXPLICIT_ENV: ','.join(sorted(getattr(options, 'explicit', ())))})
    log_file = open(options.log_file, 'ab') if options.log_file else None
    try:
        daemon = subprocess.Popen(argv, env=env, pass_fds=(write_end,), start_new_session=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL if log_file is None else log_file)
    finally:
        os.close(write_end)
        if log_file is not None:
            log_file.close()
    with os.fdopen(read_end, 'rb') as reader:
        line = reader.readline().decode(errors='replace').strip()
    if line == 'ready':
        return EXIT_OK
    if line.startswith('error '):
        _, code, message = line.split(' ', 2)
        print(f'cachefs: error: {message}', file=sys.stderr)
        daemon.wait()
        return int(code)
    status = daemon.wait()
    where = (f'; see {options.log_file}' if options.log_file
             else '; run with --foreground to see why')
    print(f'cachefs: error: the daemon exited with status {status} before the mount was ready'
          f'{where}', file=sys.stderr)
    return EXIT_INTERNAL


def _argv_of(options):
    """The parsed options back as a command line, for the daemon process. Values are joined to
    their option and the positionals follow `--`, so that a value or a path starting with '-'
    (`--region=-x`, a folder named `-data`) is never taken for an option."""
    from .config import MOUNT_OPTIONS
    argv = []
    for option in MOUNT_OPTIONS:
        value = getattr(options, option.name.replace('-', '_'))
        if option.kind == 'flag':
            if value:
                argv.append('--' + option.name)
        elif value is not None:
            argv.append(f'--{option.name}={value}')
    # the mount point as an absolute path: `cachefs umount` finds the daemon by it (control.py)
    return argv + ['--', options.source, os.path.abspath(options.mountpoint)]


# -- umount --

def command_umount(options):
    # A dead mount (its daemon was killed) has no daemon to wait for: unmount it lazily.
    mount = control.open_mount(options.mountpoint, allow_dead=True)
    pid = None if mount.dead else mount.daemon_pid()
    mounts.unmount(mount.mountpoint, lazy=mount.dead)
    if pid is not None and not _wait_for_exit(pid, options.timeout):
        print(f'cachefs: warning: unmounted, but daemon {pid} is still running after '
              f'{options.timeout:g}s', file=sys.stderr)
    return EXIT_OK


def process_alive(pid):
    """True while `pid` runs; a zombie waiting for its reaper counts as gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def _wait_for_exit(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.02)
    return False


# -- stats --

def read_stats(mountpoint):
    return control.open_mount(mountpoint).stats()


def command_stats(options):
    stats = read_stats(options.mountpoint)
    if options.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return EXIT_OK
    print('\n'.join(format_stats(stats)))
    return EXIT_OK


def _percent(part, whole):
    return f'{part / whole:.1%}' if whole else '-'


def format_stats(stats):
    """The lines of `cachefs stats` for humans."""
    lookups = stats['hits'] + stats['misses']
    lines = [
        f"source          {stats['source']}  (pid {stats['pid']}, up {stats['uptime_s']:.0f}s)",
        f"dataset         {stats['files']} files, {format_size(stats['dataset_bytes'])}",
        f"hit ratio       {_percent(stats['hits'], lookups)} of {lookups} block reads: "
        f"{stats['memory_hits']} from memory, {stats['disk_hits']} from SSD, "
        f"{stats['misses']} from the store ({stats['shared_fetches']} shared a fetch)",
        f"from the store  {format_size(stats['store_bytes'])} in {stats['store_requests']} "
        f"requests, {stats['store_retries']} retries, {stats['store_errors']} errors",
        f"from the cache  {stats['hits']} block reads ({stats['memory_hits']} memory, "
        f"{stats['disk_hits']} SSD)",
        f"prefetch        {stats['prefetches']} blocks, {format_size(stats['prefetched_bytes'])} "
        "read ahead" + (f", {format_size(stats['prefetch_memory_used_bytes'])} in flight"
                        if 'prefetch_memory_used_bytes' in stats else ''),
        f"memory tier     {format_size(stats['memory_used_bytes'])} of "
        f"{format_size(stats['memory_capacity_bytes'])} "
        f"({_percent(stats['memory_used_bytes'], stats['memory_capacity_bytes'])}), "
        f"{stats['memory_blocks']} blocks, {stats['memory_evictions']} evictions",
    ]
    if stats['disk_capacity_bytes']:
        lines.append(
            f"SSD tier        {format_size(stats['disk_used_bytes'])} of "
            f"{format_size(stats['disk_capacity_bytes'])} "
            f"({_percent(stats['disk_used_bytes'], stats['disk_capacity_bytes'])}), "
            f"{stats['evictions']} evictions ({stats['eviction_policy']}), "
            f"{stats['disk_writes']} writes ({stats['disk_writes_pending']} pending, "
            f"{stats['disk_skipped_writes']} skipped, {stats['disk_write_errors']} failed), "
            f"{stats['disk_corrupt_blocks']} corrupt blocks dropped")
    else:
        lines.append('SSD tier        off (--cache-size 0)')
    if 'cluster_hits' in stats:
        down = sorted(p for p, state in stats['cluster_peer_states'].items() if state != 'up')
        lines += [
            f"cluster tier    {stats['cluster_hits']} hits "
            f"({format_size(stats['cluster_read_bytes'])}), {stats['cluster_misses']} misses, "
            f"{stats['cluster_skipped']} skipped, {stats['cluster_errors']} errors "
            f"({stats['cluster_timeouts']} timeouts, {stats['cluster_refused_blocks']} refused "
            f"blocks), {stats.get('cluster_waits', 0)} waited for another node's fetch "
            f"({stats.get('cluster_wait_timeouts', 0)} in vain)",
            f"cluster fills   {stats['cluster_fills']} blocks "
            f"({format_size(stats['cluster_fill_bytes'])}), {stats['cluster_fill_queue']} "
            f"queued, {stats['cluster_fills_dropped']} dropped, "
            f"{stats['cluster_fill_errors']} failed",
            f"cluster peers   {stats['cluster_peers_up']} of {stats['cluster_peers']} up"
            + (f"; down: {', '.join(down)}" if down else '')]
    lines += format_latency(stats.get('fuse_ops', {}), stats.get('fuse_latency_buckets', ()))
    return lines


def _format_seconds(seconds, ceiling):
    """A latency for humans; `inf` (the open last bucket) shows as more than `ceiling`."""
    if seconds is None:
        return '-'
    if math.isinf(seconds):
        return '>' + _format_seconds(ceiling, ceiling)
    if seconds < 1e-3:
        return f'{seconds * 1e6:.0f}us'
    if seconds < 1:
        return f'{seconds * 1e3:.{1 if seconds < 0.01 else 0}f}ms'
    return f'{seconds:.2f}s'


def format_latency(ops, bounds):
    """p50/p90/p99 per FUSE operation, interpolated within the histogram buckets."""
    from .metrics import percentile
    if not ops or not bounds:
        return []
    lines = [f"latency         {'op':<12}{'count':>9}{'p50':>9}{'p90':>9}{'p99':>9}"]
    for op, entry in sorted(ops.items(), key=lambda item: -item[1]['count']):
        cells = ''.join(f"{_format_seconds(percentile(entry['buckets'], bounds, q), bounds[-1]):>9}"
                        for q in (0.5, 0.9, 0.99))
        lines.append(f"                {op:<12}{entry['count']:>9}{cells}")
    return lines


def command_refresh(options):
    mount = control.open_mount(options.mountpoint)
    before = mount.stats()
    mount.request_refresh()
    deadline = time.monotonic() + options.timeout
    while time.monotonic() < deadline:
        after = mount.stats()
        if after['listing_generation'] > before['listing_generation']:
            print(f"refreshed: {after['files']} files, {format_size(after['dataset_bytes'])}")
            return EXIT_OK
        time.sleep(0.05)
    raise UserError(f'no new listing after {options.timeout:g}s; see the daemon log',
                    EXIT_STORE)


def command_demo(options):
    from .demo.run import run_demo
    return run_demo(options)


def command_warmup(options):
    from .warmup import command_warmup as run_warmup
    return run_warmup(options)


COMMANDS = {'mount': command_mount, 'umount': command_umount, 'unmount': command_umount,
            'refresh': command_refresh, 'stats': command_stats, 'warmup': command_warmup,
            'demo': command_demo}


def mount_helper(argv=None):
    """`mount.cachefs SOURCE MOUNTPOINT [-o options]`, as mount(8) and fstab call it.

    mount(8) passes -n (no mtab), -s (sloppy), -v (verbose) and -f (fake: do nothing).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if '-f' in argv:
        return EXIT_OK
    argv = [arg for arg in argv if arg not in ('-n', '-s', '-v')]
    return main(['mount'] + argv)
