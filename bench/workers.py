"""The readers: what a training job does to the files, timed, and the content check.

An epoch is read by `read_in_processes` (a DataLoader's worker processes): each reader takes its
share of a shuffled list, dealt round-robin, and reads every file whole with 1 MiB reads into one
reused buffer, or parses it as a TFRecord input pipeline does. The readers are forked before the
clock starts, so process start-up is not timed. Small files are read by threads
(`read_small_files`), like a thread-pool image loader. sha256 is never computed inside a timed
read: at ~1.5 GiB/s per core it would be the bottleneck; `verify_tree` checks content in its own
pass.
"""

import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor

from cachefs.demo.dataset import file_sha256, parse_sample
from cachefs.demo.tfrecord import iter_records

from . import host

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
#: A file that takes longer than this to read means a hung mount, not a slow one.
FILE_TIMEOUT = 600.0

_buffer = None  # one per reader process (or per thread in read_small_files)


def read_file(path):
    """Read `path` whole with 1 MiB reads; returns (bytes, 1)."""
    global _buffer
    if _buffer is None:
        _buffer = bytearray(READ_SIZE)
    total = 0
    with open(path, 'rb', buffering=0) as f:
        while True:
            n = f.readinto(_buffer)
            if not n:
                break
            total += n
    return total, 1


def parse_tfrecord(path):
    """Parse every record of a TFRecord shard, CRCs checked; returns (bytes, records).

    The 1 MiB buffer and the per-record parse (header check, zero-copy pixel view) are what
    a tf.data or PyTorch TFRecord reader does per sample.
    """
    total = records = 0
    with open(path, 'rb', buffering=READ_SIZE) as f:
        for payload in iter_records(f, verify=True):
            label, height, width, pixels = parse_sample(payload)
            if len(pixels) != height * width * 3:
                raise ValueError(f'{path}: record {records} has a bad size')
            total += len(payload)
            records += 1
    return total, records


def read_in_processes(function, paths, processes):
    """Apply `function` to every path in `processes` forked readers: (bytes, items, seconds).

    Paths are dealt round-robin, as a DataLoader deals batches to its workers. The readers are
    forked and report ready before the clock starts; the clock stops when the last one is done.
    Plain processes and pipes rather than multiprocessing.Pool: Pool.terminate can hang on a
    worker that waits for the pool's queue lock, which is no way to end a benchmark.
    """
    ctx = multiprocessing.get_context('fork')
    shares = [paths[i::processes] for i in range(processes)]
    shares = [share for share in shares if share]
    readers = []
    try:
        for share in shares:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_reader, args=(function, share, child_end), daemon=True)
            proc.start()
            child_end.close()
            readers.append((proc, parent_end, share))
        host.check_stop()
        for proc, conn, _ in readers:
            _receive(conn, proc, 60.0)            # 'ready'
        started = time.perf_counter()
        for _, conn, _ in readers:
            conn.send('go')
        total = items = 0
        for proc, conn, share in readers:
            nbytes, nitems = _receive(conn, proc, FILE_TIMEOUT * len(share))
            total += nbytes
            items += nitems
        seconds = time.perf_counter() - started
    finally:
        for proc, conn, _ in readers:
            proc.join(timeout=10)
            if proc.is_alive():
                # Stuck on a hung mount: SIGKILL ends even a FUSE wait.
                proc.kill()
                proc.join(timeout=10)
            conn.close()
    return total, items, seconds


def _receive(conn, proc, timeout):
    if not conn.poll(timeout):
        raise TimeoutError(f'reader pid {proc.pid} sent nothing for {timeout:.0f} s')
    message = conn.recv()
    if isinstance(message, tuple) and message and message[0] == 'error':
        raise RuntimeError(f'reader pid {proc.pid}: {message[1]}')
    return message


def _reader(function, paths, conn):
    """Body of one reader process."""
    host.reset_signals_in_child()
    try:
        conn.send('ready')
        conn.recv()                               # 'go'
        total = items = 0
        for path in paths:
            nbytes, nitems = function(path)
            total += nbytes
            items += nitems
        conn.send((total, items))
    except BaseException as exc:
        conn.send(('error', f'{type(exc).__name__}: {exc}'))
    finally:
        conn.close()


def read_small_files(paths, threads):
    """Read every file whole (one read call each), `threads` at a time: (bytes, seconds)."""
    def one(path):
        with open(path, 'rb', buffering=0) as f:
            return len(f.read())

    started = time.perf_counter()
    total = sum(map_threads(one, paths, threads))
    return total, time.perf_counter() - started


def map_threads(function, items, threads, timeout=FILE_TIMEOUT * 4):
    """`function` over `items` in `threads` threads; results in order.

    Unlike `with ThreadPoolExecutor()`, a failure or timeout does not wait for threads that are
    stuck on a hung mount: the caller's cleanup aborts the mount, which frees them.
    """
    pool = ThreadPoolExecutor(threads)
    try:
        results = list(pool.map(function, items, timeout=timeout))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def verify_tree(root, entries, threads=4):
    """Compare the files under `root` with a manifest; returns a list of problems (empty: ok).

    Checks that exactly the manifest's files are listed, then every file's size and sha256.
    hashlib and reads release the GIL, so threads use both cores.
    """
    problems = []
    listed = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            listed.add(os.path.relpath(os.path.join(dirpath, name), root))
    expected = {rel for rel, _, _ in entries}
    if listed != expected:
        missing, extra = sorted(expected - listed), sorted(listed - expected)
        problems.append(f'listing differs: {len(missing)} missing (e.g. {missing[:3]}), '
                        f'{len(extra)} unexpected (e.g. {extra[:3]})')

    def check(entry):
        rel, size, digest = entry
        path = os.path.join(root, rel)
        try:
            actual_size = os.path.getsize(path)
            actual = file_sha256(path)
        except OSError as exc:
            return f'{rel}: {exc}'
        if actual_size != size:
            return f'{rel}: size {actual_size}, expected {size}'
        if actual != digest:
            return f'{rel}: sha256 differs'
        return None

    problems += [p for p in map_threads(check, entries, threads) if p]
    return problems
