"""pyfuse3 request handlers: a read-only filesystem over a `namespace.Tree` and a `BlockCache`.

Metadata requests (lookup, getattr, readdir, open, statfs) are answered from the tree without
yielding to the event loop and never reach the store. Reads go to the block cache. Every write
request fails with EROFS.

pyfuse3 ends its main loop when a handler raises anything but `FUSEError`, which would take the
mount down; `_handler` turns every other exception into EIO (logged with its traceback) and every
store error into its errno.

Control channel: extended attributes of the root folder (`user.cachefs.pid`,
`user.cachefs.stats`) let `cachefs umount` and `cachefs stats` find and query the daemon of a
mount without any file or socket of their own; `control.py` owns that protocol.
"""

from __future__ import annotations

import bisect
import errno
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, NoReturn, ParamSpec, Protocol, TypeVar

import pyfuse3

from ..control import XATTR_CACHED, XATTR_PID, XATTR_STATS   # names of the control protocol
from ..metrics import LATENCY_BUCKETS   # the histogram's bounds belong to the metrics they feed
from ..namespace import ROOT_INODE, Node, Tree, file_mode
from ..ufs.errors import StoreError

log = logging.getLogger(__name__)

#: what a read answers: a block's bytes or a view of them (pyfuse3 takes any buffer)
Buffer = bytes | bytearray | memoryview
#: the daemon's counters as a JSON-able dict (`Daemon.stats`), for `cachefs stats`
StatsFn = Callable[[], dict[str, Any]]


class BlockReader(Protocol):
    """What the handlers use of the block cache (`cache.blocks.BlockCache`)."""

    block_size: int

    async def read(self, key: str, etag: str, file_size: int, offset: int,
                   size: int) -> Buffer: ...

    def cached_blocks(self, key: str, etag: str, file_size: int) -> tuple[int, int]: ...


class OpLatency:
    """Count, total time and a histogram of one FUSE operation (for stats and metrics)."""
    __slots__ = ('count', 'seconds', 'buckets')

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def record(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {'count': self.count, 'seconds': self.seconds, 'buckets': list(self.buckets)}


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


P = ParamSpec('P')
R = TypeVar('R')


def _handler(method: Callable[Concatenate[Operations, P], Awaitable[R]]
             ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Operations, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except StoreError as exc:
            log.warning('%s failed: %s', method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception('unexpected error in %s%r; answering EIO', method.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            latency = self.latency.get(name)
            if latency is None:
                latency = self.latency[name] = OpLatency()
            latency.record(time.perf_counter() - started)
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, cache: BlockReader, *, entry_timeout: float,
                 attr_timeout: float, uid: int, gid: int, stats: StatsFn | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.cache = cache
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.uid = uid
        self.gid = gid
        self.stats: StatsFn = stats or (lambda: {})
        # An open file keeps the version it was opened with, so one handle never mixes the
        # bytes of two versions, even when a refresh replaces the tree meanwhile.
        self._handles: dict[int, Node] = {}
        self._next_handle = 1
        # Nodes of a replaced tree that the kernel may still ask about. Kept only while the kernel
        # holds a reference (its lookup count) or a handle is open on them, so that a mount
        # refreshed for months holds no more of them than the kernel does.
        self._retired: dict[int, Node] = {}
        self._lookups: dict[int, int] = {}      # inode -> references the kernel holds
        self._open_counts: dict[int, int] = {}  # inode -> open file handles
        self.latency: dict[str, OpLatency] = {}     # operation name -> OpLatency

    @property
    def retired_nodes(self) -> int:
        """Nodes of replaced trees still held for the kernel (stats, metrics)."""
        return len(self._retired)

    def _node(self, inode: int) -> Node:
        node = self.tree.get(inode) or self._retired.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def replace_tree(self, tree: Tree) -> None:
        """Serve `tree` from now on; inodes it no longer has stay answerable until forgotten."""
        old = self.tree
        # only the inodes the kernel holds or that are open: the tree makes nodes on demand
        for inode in [*self._lookups, *self._open_counts]:
            node = old.get(inode)
            if node is not None and inode not in tree.nodes:
                self._retired[inode] = node
        for inode in [inode for inode in self._retired if inode in tree.nodes]:
            del self._retired[inode]          # back in the tree (the same key and version)
        self.tree = tree

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of `node` for a reply that gives the kernel a reference to it."""
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1
        return self._attributes(node)

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = file_mode(node)
        attrs.st_nlink = 2 if node.is_dir else 1
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_size = node.size
        attrs.st_blksize = self.cache.block_size
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        attrs.entry_timeout = self.entry_timeout
        attrs.attr_timeout = self.attr_timeout
        return attrs

    # -- metadata: answered from the tree --

    @_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if name == b'.':
            return self._entry(self._node(parent_inode))
        if name == b'..':
            return self._entry(self._node(self._node(parent_inode).parent))
        node = self.tree.lookup(parent_inode, name)
        if node is None:
            self._node(parent_inode)
            # A negative entry (inode 0): the kernel caches the miss for entry_timeout, so
            # probing a missing name does not cost a request each time. A refresh that adds
            # the name invalidates it.
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = 0
            attrs.entry_timeout = self.entry_timeout
            return attrs
        return self._entry(node)

    @_handler
    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # The tree holds its inodes for the life of the mount; only retired ones are released,
        # once the kernel holds no reference to them and no handle is open on them.
        for inode, nlookup in inode_list:
            left = self._lookups.get(inode, 0) - nlookup
            if left > 0:
                self._lookups[inode] = left
                continue
            self._lookups.pop(inode, None)
            if inode not in self._open_counts:
                self._retired.pop(inode, None)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = self._node(fh)
        children = folder.children
        names = folder.sorted_names
        if children is None or names is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # start_id is the index of the next entry to send; READDIRPLUS takes the attributes too.
        for index in range(start_id, len(names)):
            name = names[index]
            # READDIRPLUS: an entry the kernel takes is a reference, as a lookup is.
            node = children.at(index)
            if not pyfuse3.readdir_reply(token, name, self._attributes(node), index + 1):
                return
            self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1

    async def releasedir(self, fh: int) -> None:
        pass

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        block_size = self.cache.block_size
        stats.f_bsize = stats.f_frsize = block_size
        stats.f_blocks = (self.tree.total_bytes + block_size - 1) // block_size
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.tree.nodes)
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # -- data --

    @_handler
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_handle
        self._next_handle += 1
        self._handles[fh] = node
        self._open_counts[inode] = self._open_counts.get(inode, 0) + 1
        # The object is immutable for a given ETag: let the kernel keep its pages across opens
        # (a refresh that sees a new ETag drops them with invalidate_inode).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_handler
    # pyfuse3's annotation says bytes; it takes any buffer, and the cache answers with views of
    # its blocks rather than copies
    async def read(self, fh: int, offset: int, size: int) -> Buffer:  # type: ignore[override]
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.cache.read(node.key, node.etag, node.size, offset, size)

    async def release(self, fh: int) -> None:
        node = self._handles.pop(fh, None)
        if node is None:
            return
        inode = node.inode
        left = self._open_counts.pop(inode, 1) - 1
        if left > 0:
            self._open_counts[inode] = left
        elif inode not in self._lookups:
            self._retired.pop(inode, None)

    # -- control channel --

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE:
            if name == XATTR_PID:
                return str(os.getpid()).encode()
            if name == XATTR_STATS:
                stats = self.stats()
                stats['fuse_ops'] = {op: lat.as_dict() for op, lat in self.latency.items()}
                stats['fuse_latency_buckets'] = LATENCY_BUCKETS
                stats['fuse_retired_nodes'] = len(self._retired)
                return json.dumps(stats, sort_keys=True).encode()
        node = self._node(inode)
        if name == XATTR_CACHED and not node.is_dir:
            blocks, held = self.cache.cached_blocks(node.key, node.etag, node.size)
            cached_bytes = min(held * self.cache.block_size, node.size) if held < blocks \
                else node.size
            return json.dumps({'size': node.size, 'blocks': blocks, 'cached_blocks': held,
                               'cached_bytes': cached_bytes}).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._node(inode)
        return []

    # -- every write operation: a read-only file system --
    # (flush and fsync stay unimplemented: pyfuse3's ENOSYS makes the kernel stop sending them,
    # and an error there would make close() fail.)

    async def _refuse_write(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _refuse_write
    create = write = setxattr = removexattr = _refuse_write
