"""Mount one source and serve it until unmounted: the daemon's whole life in order.

1. checks that need no network (mount point, /dev/fuse, credentials present, cache folder);
2. the namespace: the saved listing when it is fresh, else one listing of the store;
3. pyfuse3 mount, then the trio loop; once the mount answers its own getxattr, the kernel knobs
   are raised and readiness is reported (to the parent `cachefs mount`, and to systemd);
4. SIGTERM/SIGINT or an external umount end the loop; the mount is always released.

User mistakes raise `UserError` before anything is mounted, so nothing is left behind.
"""

import argparse
import hashlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyfuse3
import trio

from . import memory_budget, mounts
from .cache import folder as cache_folder
from .cache.blocks import BlockCache
from .cache.cluster import ClusterTier, read_secret
from .cache.disk import DiskTier, disk_free
from .cache.listing import Columns, load_columns, save_listing
from .config import default_cache_dir, resolve_auto_eviction
from .errors import EXIT_ACCESS, EXIT_FUSE, EXIT_SOURCE_MISSING, EXIT_STORE, UserError
from .control import XATTR_PID
from .fuse.operations import Operations
from .metrics import start_metrics_server
from .namespace import Tree, build_tree_from_columns, tree_changes
from .ufs import SourceURL, open_store, parse_source
from .ufs.async_store import AsyncStore, call_with_retries
from .ufs.base import Store
from .ufs.errors import AccessDenied, BucketNotFound, ObjectNotFound, StoreError

log = logging.getLogger(__name__)

_MIN_REFRESH_INTERVAL = 10.0
# Stopping (docs/failure-modes.md; packaging/systemd/cachefs@.service's TimeoutStopSec=45s
# covers the sum, with room for closing the store):
_STOP_GRACE = 5       # seconds FUSE requests in flight get to answer after SIGTERM (store calls
                      # fail at once then; this bounds anything else, e.g. a stuck SSD read)
_FLUSH_TIMEOUT = 30   # seconds spent writing blocks held in memory to the SSD at unmount
_DETACH_POLL = 1.0    # seconds between checks that the mount is still attached (lazy unmount)


def source_identity(source: SourceURL, endpoint_url: str | None) -> str:
    """What names one source (and endpoint: one bucket name, two stores): its cache folder and
    its cluster namespace are both derived from it."""
    return f'{source}|{endpoint_url or ""}'


def source_folder_name(source: SourceURL, endpoint_url: str | None) -> str:
    """A readable, unique folder name per source (and endpoint: one bucket name, two stores)."""
    digest = hashlib.sha256(source_identity(source, endpoint_url).encode()).hexdigest()[:12]
    readable = re.sub(r'[^A-Za-z0-9._-]+', '_', str(source).split('://', 1)[-1]).strip('_')[:60]
    return f'{source.scheme}-{readable}-{digest}'


def prepare_cache_folder(cache_dir: str, name: str, mountpoint: str) -> cache_folder.CacheFolder:
    """The per-source folder, trusted, private and locked (cache/folder.py says why and how)."""
    return cache_folder.prepare(cache_dir, name, mountpoint)


def _store_user_error(exc: StoreError, source: SourceURL) -> UserError:
    if isinstance(exc, BucketNotFound) or (isinstance(exc, ObjectNotFound)
                                          and source.scheme == 'file'):
        if source.scheme == 'file':
            return UserError(f'source folder {source.prefix} does not exist', EXIT_SOURCE_MISSING)
        return UserError(f'bucket {source.bucket!r} of {source} does not exist',
                         EXIT_SOURCE_MISSING)
    if isinstance(exc, AccessDenied):
        return UserError(f'access denied to {source}: {exc}', EXIT_ACCESS)
    return UserError(f'cannot reach {source}: {exc}', EXIT_STORE)


def load_namespace(store: Store, source: SourceURL, folder: str,
                   options: argparse.Namespace) -> tuple[float, Columns]:
    """Return the listing: the saved one while fresh, else a new listing (then saved)."""
    saved = load_columns(folder, str(source))
    if saved is not None:
        listed_at, columns = saved
        age = time.time() - listed_at
        if age < options.metadata_ttl:
            log.info('using the saved listing of %s (%d objects, %.0fs old)', source,
                     len(columns), age)
            return listed_at, columns
    try:
        has_objects = call_with_retries(store.check_access, retry_timeout=options.retry_timeout)
        if not has_objects and source.prefix and source.scheme != 'file':
            raise UserError(f'prefix {source.prefix!r} of {source} holds no objects',
                            EXIT_SOURCE_MISSING)
        started = time.monotonic()
        objects = call_with_retries(lambda: list(store.list_objects()),
                                    retry_timeout=options.retry_timeout)
    except StoreError as exc:
        if saved is not None:
            log.warning('cannot list %s (%s); using the saved listing from %s', source, exc,
                        time.ctime(saved[0]))
            return saved
        raise _store_user_error(exc, source) from None
    log.info('listed %d objects of %s in %.1fs', len(objects), source, time.monotonic() - started)
    listed_at = time.time()
    columns = Columns.of(objects)
    del objects         # a Python object per file: not kept beside the tree being built
    try:
        save_listing(folder, str(source), columns, listed_at)
    except (OSError, ValueError) as exc:
        # only a cache: the mount works without it, the next one lists again
        log.warning('could not save the listing in %s: %s', folder, exc)
    return listed_at, columns


def _tree_and_changes(old: Tree, columns: Columns,
                      listed_at_ns: int) -> tuple[Tree, tuple[list[int], list[tuple[int, bytes]]]]:
    tree = build_tree_from_columns(columns.keys, columns.sizes, columns.etags, columns.mtimes,
                                   listed_at_ns)
    return tree, tree_changes(old, tree)


def _invalidate_inode(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode)
    except OSError:
        pass        # the kernel never saw this inode, or already forgot it


def _invalidate_entry(parent: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(parent, name)
    except OSError:
        pass


def notify_systemd(message: str) -> None:
    """sd_notify without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return
    if address.startswith('@'):
        address = '\0' + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning('could not notify systemd: %s', exc)


class Daemon:
    # set by prepare(), before anything is mounted
    store: Store
    tree: Tree
    disk: DiskTier | None
    # set by _serve(): trio objects are created inside trio.run
    async_store: AsyncStore
    cache: BlockCache
    operations: Operations

    def __init__(self, options: argparse.Namespace,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.options = options
        self.on_ready = on_ready or (lambda: None)
        self.source = parse_source(options.source)
        self.mountpoint = os.path.abspath(options.mountpoint)
        self.started_at = time.time()
        self.cluster: ClusterTier | None = None
        self.cluster_secret: bytes | None = None

    # -- setup: everything that can fail because of the user happens before mounting --

    def prepare(self) -> None:
        options = self.options
        mounts.check_fuse_device()
        mounts.check_mountpoint(self.mountpoint)
        if options.cluster and options.cluster_secret_file:
            self.cluster_secret = read_secret(options.cluster_secret_file)
        self.store = open_store(self.source, options)
        cache_dir = options.cache_dir or default_cache_dir()
        self.cache_folder = prepare_cache_folder(
            cache_dir, source_folder_name(self.source, options.endpoint_url), self.mountpoint)
        self.folder = self.cache_folder.path
        self.disk = self.make_disk_tier()
        # Options the user gave that cannot fit the memory limit are refused before the listing
        # (which may take minutes); the sizing itself waits for it, because the tree's share is
        # only known then (1.28M files are about 1.4 GiB: near the default caches).
        self.memory_limit = memory_budget.read_cgroup_limit()
        memory_budget.fit(options, 0, self.disk is not None, self.memory_limit, announce=None)
        listed_at, columns = load_namespace(self.store, self.source, self.folder, options)
        self.listed_at = listed_at
        self.listing_generation = 0
        self.tree = build_tree_from_columns(columns.keys, columns.sizes, columns.etags,
                                            columns.mtimes, int(listed_at * 1e9))
        del columns
        memory_budget.fit(options, self.tree.file_count, self.disk is not None,
                          self.memory_limit)
        resolve_auto_eviction(options, self.disk, self.tree.total_bytes)
        log.info('%s: %d files, %d folders, %d bytes', self.source, self.tree.file_count,
                 self.tree.dir_count, self.tree.total_bytes)

    def make_disk_tier(self) -> DiskTier | None:
        """The SSD tier in the source folder, or None when --cache-size is 0. A cache disk full
        at mount degrades, as it does later: blocks already there are served, none is admitted
        until space frees (or no SSD tier at all when the folder itself could not be made)."""
        options = self.options
        capacity = options.cache_size
        if capacity == 0 or capacity == '0%':
            return None
        if not self.cache_folder.locked:
            log.warning('cache disk of %s is full: no SSD tier for this mount; reads go to the '
                        'store', self.folder)
            return None
        if isinstance(capacity, str):       # a percentage of the cache disk
            capacity = int(disk_free(self.folder)[1] * float(capacity[:-1]) / 100)
        if capacity <= 0:
            return None
        try:
            disk = DiskTier(self.folder, options.block_size, capacity, options.free_space_ratio,
                            options.eviction)
        except cache_folder.DiskFull as exc:    # other errors are UserErrors already
            log.warning('cache disk of %s is full (%s): no SSD tier for this mount; reads go to '
                        'the store', self.folder, exc.strerror)
            return None
        if self.cache_folder.disk_full:
            disk.start_full()
        return disk

    def stats(self) -> dict[str, Any]:
        store = self.async_store.counters
        cache = self.cache.counters
        disk = self.cache.disk
        disk_counters = disk.counters if disk is not None else None
        stats = {
            'source': str(self.source),
            'pid': os.getpid(),
            'uptime_s': round(time.time() - self.started_at, 3),
            'listed_at': self.listed_at,
            'listing_generation': self.listing_generation,
            'files': self.tree.file_count,
            'dirs': self.tree.dir_count,
            'dataset_bytes': self.tree.total_bytes,
            'store_requests': store.requests,
            'store_bytes': store.bytes,
            'store_retries': store.retries,
            'store_errors': store.errors,
            'store_in_flight': store.in_flight,
            'hits': cache.memory_hits + cache.disk_hits,
            'memory_hits': cache.memory_hits,
            'disk_hits': cache.disk_hits,
            'misses': cache.misses,
            'shared_fetches': cache.shared_fetches,
            'prefetches': cache.prefetches,
            'prefetched_bytes': cache.prefetched_bytes,
            'prefetch_memory_used_bytes': self.cache.prefetch_memory_used,
            'prefetch_in_flight_bytes': self.cache.prefetch_in_flight,
            'prefetch_memory_capacity_bytes': self.options.prefetch_memory,
            'memory_read_bytes': cache.memory_bytes_read,
            'disk_read_bytes': cache.disk_bytes_read,
            'store_read_bytes': cache.store_bytes_read,
            'fuse_retired_nodes': self.operations.retired_nodes,
            'memory_used_bytes': self.cache.memory.used,
            'memory_capacity_bytes': self.cache.memory.capacity,
            'memory_blocks': len(self.cache.memory),
            'memory_evictions': self.cache.memory.evictions,
            'disk_used_bytes': disk.used if disk else 0,
            'disk_capacity_bytes': disk.capacity if disk else 0,
            'disk_index_ready': disk.index_ready if disk else True,
            'disk_offline': disk.offline if disk else False,
            'disk_writes': disk_counters.writes if disk_counters else 0,
            'disk_writes_pending': self.cache.disk_writes_pending,
            'disk_write_bytes': disk_counters.write_bytes if disk_counters else 0,
            'disk_skipped_writes': disk_counters.skipped_writes if disk_counters else 0,
            'disk_write_errors': disk_counters.write_errors if disk_counters else 0,
            'disk_corrupt_blocks': disk_counters.corrupt if disk_counters else 0,
            'evictions': disk_counters.evictions if disk_counters else 0,
            'eviction_policy': self.options.eviction,
            'memory_budget_bytes': memory_budget.formula_of(
                self.options, self.tree.file_count, disk is not None).total,
        }
        if self.cluster is not None:
            stats.update(self.cluster.stats())
        return stats

    # -- serving --

    def serve(self) -> None:
        options = self.options
        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {'fsname=cachefs:' + str(self.source).replace(',', '%2C'),
                         'subtype=cachefs', 'ro'}
        if options.allow_other:
            fuse_options.add('allow_other')
        trio.run(self._serve, fuse_options)

    async def _serve(self, fuse_options: set[str]) -> None:
        options = self.options
        self.async_store = AsyncStore(self.store, options.store_concurrency, options.retry_timeout)
        self._answering = trio.Event()
        self._fuse_scope: trio.CancelScope | None = trio.CancelScope()
        if options.cluster:
            # between the SSD tier and the store (cache/cluster.py); keyed like the cache folder
            self.cluster = ClusterTier(
                self.async_store, options.cluster,
                ClusterTier.namespace_of(source_identity(self.source, options.endpoint_url)),
                options.block_size, self.cluster_secret, options.cluster_connect_timeout,
                options.cluster_timeout, options.cluster_refresh, options.cluster_fill_queue,
                max_reads=options.store_concurrency)
        self.cache = BlockCache(self.cluster or self.async_store, options.block_size,
                                options.memory_cache_size,
                                self.disk, options.prefetch_window,
                                options.prefetch_memory)
        operations = self.operations = Operations(
            self.tree, self.cache, entry_timeout=options.entry_timeout,
            attr_timeout=options.attr_timeout,
            uid=os.getuid() if options.uid is None else options.uid,
            gid=os.getgid() if options.gid is None else options.gid, stats=self.stats)
        metrics = (start_metrics_server(options.metrics_addr, self.stats, operations.latency)
                   if options.metrics_addr else None)
        # Signal handlers are in place before the mount exists, so that a SIGTERM arriving as
        # soon as the mount appears still unmounts cleanly.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals, \
                trio.open_signal_receiver(signal.SIGHUP) as hangups:
            try:
                pyfuse3.init(operations, self.mountpoint, fuse_options)
            except RuntimeError as exc:
                raise UserError(f'FUSE refused to mount {self.mountpoint}: {exc}',
                                EXIT_FUSE) from None
            closed = False
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.cache.run)
                    if self.cluster is not None:
                        nursery.start_soon(self.cluster.run)
                    nursery.start_soon(self._announce_when_answering)
                    nursery.start_soon(self._stop_on_signal, stop_signals)
                    nursery.start_soon(self._refresh_periodically, hangups)
                    nursery.start_soon(self._end_reads_when_detached)
                    with self._fuse_scope:
                        await pyfuse3.main(min_tasks=4, max_tasks=options.max_idle_threads)
                    self._fuse_scope = None
                    # prefetches may still wait on the store: nobody will read them now
                    self.async_store.shut_down()
                    # Unmount first, so that nobody waits on a mount that no longer answers
                    # while the blocks held in memory go to the SSD for the next mount.
                    closed = True
                    pyfuse3.close(unmount=True)
                    log.info('%s was unmounted', self.mountpoint)
                    await self._flush_cache()
                    nursery.cancel_scope.cancel()
            finally:
                if not closed:
                    pyfuse3.close(unmount=True)
                self.store.close()
                if metrics is not None:
                    metrics.stop()

    async def _flush_cache(self) -> None:
        pending = self.cache.disk_writes_pending
        if not pending:
            return
        log.info('writing %d cached blocks to the SSD tier', pending)
        with trio.move_on_after(_FLUSH_TIMEOUT) as scope:
            await self.cache.flush()
        if scope.cancelled_caught:
            log.warning('gave up writing %d blocks to the SSD tier after %d s; the next mount '
                        'fetches them again', self.cache.disk_writes_pending, _FLUSH_TIMEOUT)

    async def _announce_when_answering(self) -> None:
        pid = str(os.getpid()).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                # abandon_on_cancel: this thread asks our own mount; if the loop stops first it
                # would wait forever, and must not keep the daemon from unmounting.
                answer = await trio.to_thread.run_sync(os.getxattr, self.mountpoint, XATTR_PID,
                                                       abandon_on_cancel=True)
                if answer == pid:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.error('the mount did not answer within 60 s')
                pyfuse3.terminate()
                return
            await trio.sleep(0.02)
        await trio.to_thread.run_sync(mounts.tune_kernel, self.mountpoint,
                                      self.options.read_ahead, self.options.max_background,
                                      abandon_on_cancel=True)
        log.info('mounted %s on %s', self.source, self.mountpoint)
        self.on_ready()
        notify_systemd('READY=1\nSTATUS=serving ' + self.mountpoint)
        self._answering.set()

    async def _refresh_periodically(self, hangups: AsyncIterator[int]) -> None:
        """List the store again every --metadata-ttl, and at once on SIGHUP (`cachefs refresh`)."""
        ttl = self.options.metadata_ttl
        delay = self.listed_at + ttl - time.time()
        while True:
            # never more often than every 10 s, even with --metadata-ttl 0
            with trio.move_on_after(max(delay, _MIN_REFRESH_INTERVAL)):
                await hangups.__anext__()
                log.info('SIGHUP: refreshing the listing of %s', self.source)
            try:
                await self.refresh()
                delay = ttl
            except StoreError as exc:
                log.warning('refreshing the listing failed (%s); keeping the current one', exc)
                delay = min(ttl, 60)

    async def refresh(self) -> None:
        """Swap in a new tree from a fresh listing and make the kernel forget what changed."""
        objects = await self.async_store.list_objects()
        listed_at = time.time()
        old = self.tree
        # Seconds of CPU at a million files (bench/tree_cost.py): in a worker thread, so that
        # the trio thread keeps answering the kernel meanwhile (both share the GIL, so requests
        # are slower then, not stopped). The old tree is only read there; nothing else swaps it
        # (refreshes run one after another).
        columns = await trio.to_thread.run_sync(Columns.of, objects)
        del objects
        tree, (changed, stale_entries) = await trio.to_thread.run_sync(
            _tree_and_changes, old, columns, int(listed_at * 1e9))
        self.operations.replace_tree(tree)
        self.tree = tree
        self.listed_at = listed_at
        for inode in changed:
            await trio.to_thread.run_sync(_invalidate_inode, inode)
        for parent, name in stale_entries:
            await trio.to_thread.run_sync(_invalidate_entry, parent, name)
        self.listing_generation += 1
        log.info('refreshed %s: %d folders and %d names changed, %d files', self.source,
                 len(changed), len(stale_entries), tree.file_count)
        try:
            await trio.to_thread.run_sync(save_listing, self.folder, str(self.source), columns,
                                          listed_at)
        except (OSError, ValueError) as exc:
            log.warning('could not save the listing: %s', exc)

    async def _stop_on_signal(self, stop_signals: AsyncIterator[int]) -> None:
        async for signum in stop_signals:
            log.info('received %s: unmounting %s', signal.Signals(signum).name, self.mountpoint)
            notify_systemd('STOPPING=1')
            # pyfuse3.main returns only once every FUSE request under way is answered: a read
            # stalled in the store would keep the daemon for its whole retry time. Its store
            # call fails now instead, and the reader gets EIO.
            self.async_store.shut_down()
            pyfuse3.terminate()
            await trio.sleep(_STOP_GRACE)
            if self._fuse_scope is not None:
                log.warning('FUSE requests still unanswered %d s after %s; stopping without '
                            'them (their readers get ENOTCONN)', _STOP_GRACE,
                            signal.Signals(signum).name)
                self._fuse_scope.cancel()
            return

    async def _end_reads_when_detached(self) -> None:
        """After a lazy unmount (`umount -l`, `fusermount3 -u -z`) the kernel keeps the mount
        alive for the files still open, and tells the daemon nothing until the last one closes.
        A reader waiting on a stalled store would keep it (and this daemon) for its whole retry
        time: once the mount is gone from the mount table, store calls fail (EIO), so that the
        last readers finish and the kernel ends the connection."""
        await self._answering.wait()
        entry = await trio.to_thread.run_sync(mounts.find_mount, self.mountpoint,
                                              abandon_on_cancel=True)
        if entry is None or entry.fstype != 'fuse.cachefs':
            return
        device = (entry.dev_major, entry.dev_minor)

        def attached() -> bool:
            return any((e.dev_major, e.dev_minor) == device for e in mounts.mount_entries())
        while await trio.to_thread.run_sync(attached, abandon_on_cancel=True):
            await trio.sleep(_DETACH_POLL)
        log.info('%s was detached (lazy unmount): store reads in flight fail now',
                 self.mountpoint)
        self.async_store.shut_down()
