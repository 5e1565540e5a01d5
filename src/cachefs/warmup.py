"""`cachefs warmup`: load files or folders of a mount into its cache before training.

Warm-up goes through the daemon like any reader: each file is read through the mount with
1 MiB reads, by `--threads` readers, so the blocks land in the memory tier and are written to the
SSD tier. The kernel page cache is not filled by it: a file's pages are dropped before it is read
(otherwise a read the page cache answers never reaches the daemon) and again afterwards.

It is resumable: the `user.cachefs.cached` xattr of each file tells how many of its blocks the
daemon holds, and files that are fully cached are skipped, so an interrupted warm-up continues
where it stopped. `--check` only sums that xattr.

Before reporting, it waits until the daemon has no SSD writes pending, so that a warmed file is
on the SSD (a daemon stopped right afterwards keeps it). When the SSD tier refused or evicted
blocks during the run (it is full, or smaller than the data), the summary says so.
"""

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import control
from .errors import EXIT_OK, EXIT_STORE, EXIT_USAGE, UserError
from .logs import one_line
from .units import format_size

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
PROGRESS_INTERVAL = 5.0          # seconds between plain progress lines (not a terminal)
POLL_INTERVAL = 0.05             # seconds between progress updates and looks at the daemon
SHOWN_ERRORS = 5


def find_mount(path):
    """The checked cachefs mount holding `path` (control.py); a one-line UserError if none."""
    return control.open_mount(path, inside=True)


def _raise(exc):
    raise exc


def list_files(paths):
    """[(path, size)] of every file under `paths` (each a file or a folder), each once, sorted."""
    found = {}
    for path in paths:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            found[path] = os.stat(path).st_size
            continue
        for folder, dirs, files in os.walk(path, onerror=_raise):
            dirs.sort()
            for name in files:
                full = os.path.join(folder, name)
                found[full] = os.stat(full).st_size
    return sorted(found.items())


def cached_state(path):
    """(size, cached bytes, fully cached) of one file, from the daemon."""
    state = control.cached_state(path)
    return state['size'], state['cached_bytes'], state['cached_blocks'] >= state['blocks']


class Progress:
    """Bytes and files done, shown as a tqdm bar on a terminal, else as a line every few seconds.
    Workers only add to the counters under a lock; one thread draws."""

    def __init__(self, total_bytes, total_files, stream=None):
        self.lock = threading.Lock()
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.bytes = 0
        self.files = 0
        self.started = time.monotonic()
        self.stream = stream or sys.stderr
        self._shown_bytes = 0
        self._last_line = self.started
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_bytes, unit='iB', unit_scale=True, unit_divisor=1024,
                             desc='warmup', file=self.stream, dynamic_ncols=True,
                             smoothing=0.1)

    def add_bytes(self, count):
        with self.lock:
            self.bytes += count

    def add_file(self):
        with self.lock:
            self.files += 1

    def show(self, final=False):
        with self.lock:
            done_bytes, done_files = self.bytes, self.files
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f'{done_files}/{self.total_files} files', refresh=False)
            self._bar.update(done_bytes - self._shown_bytes)
            self._shown_bytes = done_bytes
            return
        if not final and now - self._last_line < PROGRESS_INTERVAL:
            return
        self._last_line = now
        elapsed = max(now - self.started, 1e-6)
        rate = done_bytes / elapsed
        left = self.total_bytes - done_bytes
        eta = f', ETA {left / rate:.0f}s' if rate and left > 0 else ''
        share = done_bytes / self.total_bytes if self.total_bytes else 1.0
        print(f'warmup: {format_size(done_bytes)} of {format_size(self.total_bytes)} '
              f'({share:.0%}), {done_files} of {self.total_files} files, '
              f'{format_size(rate)}/s{eta}', file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self.show()
            self._bar.close()


class Warmup:
    """One run of `cachefs warmup` over a list of files of one or more mounts."""

    def __init__(self, mounts, threads):
        self.mounts = {mount.mountpoint: mount for mount in mounts}
        self.roots = sorted(self.mounts)
        self.threads = threads
        self.stop = threading.Event()
        self.errors = []            # (path, message)
        self.loaded = []            # paths read to the end
        self.lock = threading.Lock()

    # -- the daemon's state --

    def states(self, files):
        """{path: (size, cached bytes, fully cached)}, asked `threads` at a time."""
        def one(item):
            path, size = item
            try:
                return path, cached_state(path)
            except (OSError, ValueError, KeyError) as exc:
                self.error(path, exc)
                return path, None
        with ThreadPoolExecutor(self.threads) as pool:
            return {path: state for path, state in pool.map(one, files) if state is not None}

    def daemon_stats(self):
        totals: dict[str, int] = {}
        for mount in self.mounts.values():
            try:
                stats = mount.stats()
            except UserError:
                continue
            for key in ('disk_writes_pending', 'disk_skipped_writes', 'evictions'):
                totals[key] = totals.get(key, 0) + stats.get(key, 0)
        return totals

    def error(self, path, exc):
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        with self.lock:
            self.errors.append((path, message))

    # -- loading --

    def load(self, path, progress):
        """Read one file through the mount; False when it failed or the run was stopped."""
        try:
            with open(path, 'rb', buffering=0) as f:
                fd = f.fileno()
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                buffer = bytearray(READ_SIZE)
                try:
                    while not self.stop.is_set():
                        count = f.readinto(buffer)
                        if not count:
                            break
                        progress.add_bytes(count)
                finally:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            self.error(path, exc)
            return False
        if self.stop.is_set():
            return False
        progress.add_file()
        with self.lock:
            self.loaded.append(path)
        return True

    @staticmethod
    def draw(progress, done):
        while not done.wait(POLL_INTERVAL):
            progress.show()

    def wait_for_disk_writes(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            if not self.daemon_stats().get('disk_writes_pending', 0):
                return
            time.sleep(POLL_INTERVAL)

    def run(self, files):
        """Load every file that is not fully cached; returns the summary dict."""
        started = time.monotonic()
        states = self.states(files)
        todo = [(path, size) for path, size in files
                if path in states and not states[path][2]]
        before = self.daemon_stats()
        progress = Progress(sum(size for _, size in todo), len(todo))
        done = threading.Event()
        watcher = threading.Thread(target=self.draw, args=(progress, done), daemon=True,
                                   name='warmup-progress')
        watcher.start()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix='warmup')
        try:
            for future in [pool.submit(self.load, path, progress) for path, _ in todo]:
                future.result()
            self.wait_for_disk_writes()
        except KeyboardInterrupt:
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            done.set()
            watcher.join()
            progress.show(final=True)
            progress.close()
            self.summary = self._summary(files, states, before, started)
        return self.summary

    def _summary(self, files, states, before, started):
        after = self.daemon_stats()
        loaded = list(self.loaded)
        seconds = time.monotonic() - started
        cached = [path for path, _ in files if path in states and states[path][2]]
        bytes_loaded = sum(states[path][0] - states[path][1] for path in loaded)
        return {
            'mounts': self.roots,
            'files': len(files),
            'bytes': sum(size for _, size in files),
            'files_loaded': len(loaded),
            'bytes_loaded': bytes_loaded,
            'files_already_cached': len(cached),
            'bytes_already_cached': sum(states[path][1] for path in states),
            'errors': len(self.errors),
            'failed': [{'path': path, 'error': message} for path, message in self.errors],
            'seconds': round(seconds, 3),
            'bytes_per_second': round(bytes_loaded / seconds) if seconds > 0 else 0,
            'interrupted': self.stop.is_set(),
            'disk_skipped_writes': after.get('disk_skipped_writes', 0)
            - before.get('disk_skipped_writes', 0),
            'disk_evictions': after.get('evictions', 0) - before.get('evictions', 0),
        }


def check(files, threads):
    """How much of `files` the cache holds, without loading anything."""
    runner = Warmup([], threads)
    states = runner.states(files)
    total = sum(size for _, size in files)
    cached_bytes = sum(state[1] for state in states.values())
    return {
        'files': len(files),
        'bytes': total,
        'files_cached': sum(1 for state in states.values() if state[2]),
        'cached_bytes': cached_bytes,
        'cached_ratio': cached_bytes / total if total else 1.0,
        'errors': len(runner.errors),
        'failed': [{'path': path, 'error': message} for path, message in runner.errors],
    }


def _print_errors(result):
    if not result['errors']:
        return
    print(f"errors          {result['errors']} files could not be read:")
    for failure in result['failed'][:SHOWN_ERRORS]:
        # a path is a store key and an error may quote one: one line each, as in the log
        print(f"  {one_line(failure['path'])}: {one_line(failure['error'])}")
    if result['errors'] > SHOWN_ERRORS:
        print(f"  ... and {result['errors'] - SHOWN_ERRORS} more")


def print_check(result):
    print(f"cached          {format_size(result['cached_bytes'])} of "
          f"{format_size(result['bytes'])} ({result['cached_ratio']:.1%})")
    print(f"files           {result['files_cached']} of {result['files']} fully cached")
    _print_errors(result)


def print_summary(result):
    rate = format_size(result['bytes_per_second'])
    state = 'interrupted' if result['interrupted'] else 'done'
    print(f"warmup {state}: {result['files']} files, {format_size(result['bytes'])} "
          f"in {result['seconds']:.2f}s")
    print(f"loaded          {result['files_loaded']} files, "
          f"{format_size(result['bytes_loaded'])} ({rate}/s)")
    print(f"already cached  {result['files_already_cached']} files skipped, "
          f"{format_size(result['bytes_already_cached'])} in all")
    if result['disk_skipped_writes'] or result['disk_evictions']:
        print(f"warning         the SSD tier skipped {result['disk_skipped_writes']} blocks and "
              f"evicted {result['disk_evictions']}: it cannot hold all of this (see cachefs "
              "stats); run warmup --check to see what stayed")
    _print_errors(result)
    if result['interrupted']:
        print('run the same warmup again to continue where it stopped')


def command_warmup(options):
    if options.threads < 1:
        raise UserError('--threads must be at least 1', EXIT_USAGE)
    mounts = [find_mount(path) for path in options.paths]
    try:
        files = list_files(options.paths)
    except OSError as exc:
        raise UserError(f'cannot list {exc.filename}: {exc.strerror}', EXIT_USAGE) from None
    if options.check:
        result = check(files, options.threads)
        result['mounts'] = sorted({mount.mountpoint for mount in mounts})
        if options.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            print_check(result)
        return EXIT_STORE if result['errors'] else EXIT_OK
    runner = Warmup(mounts, options.threads)
    try:
        result = runner.run(files)
    except KeyboardInterrupt:
        result = runner.summary
    if options.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print_summary(result)
    if result['interrupted']:
        return 130
    return EXIT_STORE if result['errors'] else EXIT_OK
