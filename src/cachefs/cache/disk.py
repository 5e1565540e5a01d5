"""The SSD tier: one file per cached block, checksummed, written atomically, kept across restarts.

Layout: `<source folder>/blocks/<2 hex>/<32 hex>.blk`, the name a hash of (key, ETag, block
index, block size), so a block of a changed object (new ETag) or of another block size has
another name and can never be mistaken for this one. Each file is a header followed by the data
at a 4 KiB-aligned offset:

    magic 'CFSBLK01' | header size u32 | index u64 | data length u32 | chunk size u32 |
    key length u32 | etag length u32 | key | etag | one xxh3-64 per chunk of the data

A read verifies the identity in the header and the hash of every chunk it touches, so a torn,
truncated or bit-flipped file is detected: the block is dropped and fetched again, never served.
Writes go to a temporary name in the same folder and are renamed into place: a reader sees a
whole block or none. They use O_DIRECT where the file system allows it, so the file is padded
with zeros to a multiple of 4 KiB after the data (the header's data length says where the data
ends). No fsync: after a power loss a block may be incomplete, and the checksums catch that.

Threads: the blocking functions here (`read_block_file`, `write_block_file`, `scan`) touch no
shared state and may run in any worker thread. `DiskTier` itself (index, LRU order, counters) is
only touched by the trio thread; nothing takes a lock.
"""

import errno
import hashlib
import logging
import mmap
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict

import xxhash

from .folder import own_private_folder

log = logging.getLogger(__name__)

MAGIC = b'CFSBLK01'
_FIXED = struct.Struct('<8sIQIIII')
_ALIGN = 4096
CHUNK_SIZE = 256 * 1024
SUFFIX = '.blk'
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
PROBE_INTERVAL = 30.0   # seconds between probes of an offline disk (cache/blocks.py)
# In the names of this process's temporary block files. A pid alone is not enough: pids repeat
# across containers, and a leftover named with our pid would be kept forever.
TEMP_TAG = f'.tmp{os.getpid()}.{secrets.token_hex(6)}-'


class CorruptBlock(Exception):
    """A block file that fails its identity or checksum test."""


class Header:
    __slots__ = ('data_offset', 'length', 'chunk_size', 'hashes')

    def __init__(self, data_offset, length, chunk_size, hashes):
        self.data_offset = data_offset
        self.length = length
        self.chunk_size = chunk_size
        self.hashes = hashes


def block_name(block_id, block_size):
    key, etag, index = block_id
    digest = hashlib.blake2b(f'{key}\0{etag}\0{index}\0{block_size}'.encode(
        'utf-8', 'surrogateescape'), digest_size=16).hexdigest()
    return digest[:2] + '/' + digest + SUFFIX


def encode_block(block_id, data):
    """Header + padding + data, as one list of buffers for writev."""
    key, etag, index = block_id
    key_bytes = key.encode('utf-8', 'surrogateescape')
    etag_bytes = etag.encode()
    view = memoryview(data)
    hashes = [xxhash.xxh3_64_intdigest(view[i:i + CHUNK_SIZE])
              for i in range(0, len(data), CHUNK_SIZE)]
    size = _FIXED.size + len(key_bytes) + len(etag_bytes) + 8 * len(hashes)
    data_offset = (size + _ALIGN - 1) // _ALIGN * _ALIGN
    header = b''.join([
        _FIXED.pack(MAGIC, data_offset, index, len(data), CHUNK_SIZE, len(key_bytes),
                    len(etag_bytes)),
        key_bytes, etag_bytes, struct.pack(f'<{len(hashes)}Q', *hashes)])
    return [header + bytes(data_offset - len(header)), data]


def parse_header(raw, block_id):
    """Check that `raw` (the file's first bytes) is the header of `block_id`; return a Header."""
    key, etag, index = block_id
    if len(raw) < _FIXED.size:
        raise CorruptBlock('truncated header')
    magic, data_offset, found_index, length, chunk_size, key_len, etag_len = _FIXED.unpack_from(raw)
    if magic != MAGIC or found_index != index or chunk_size <= 0:
        raise CorruptBlock('bad magic or index')
    chunks = (length + chunk_size - 1) // chunk_size
    end = _FIXED.size + key_len + etag_len + 8 * chunks
    if end > data_offset or end > len(raw):
        raise CorruptBlock('truncated header')
    position = _FIXED.size
    found_key = bytes(raw[position:position + key_len])
    found_etag = bytes(raw[position + key_len:position + key_len + etag_len])
    if found_key != key.encode('utf-8', 'surrogateescape') or found_etag != etag.encode():
        raise CorruptBlock('block of another object')
    hashes = struct.unpack_from(f'<{chunks}Q', raw, position + key_len + etag_len)
    return Header(data_offset, length, chunk_size, hashes)


def read_verified(fd, header, start, length, flags=0):
    """Read [start, start+length) of the block's data, verifying every chunk it touches.

    With flags=os.RWF_NOWAIT this raises BlockingIOError instead of waiting for the disk.
    """
    chunk_size = header.chunk_size
    first = start // chunk_size
    last = (min(start + length, header.length) - 1) // chunk_size
    lo = first * chunk_size
    hi = min((last + 1) * chunk_size, header.length)
    buffer: bytes | bytearray
    if flags:
        buffer = bytearray(hi - lo)
        got = os.preadv(fd, [buffer], header.data_offset + lo, flags)
        if got != len(buffer):
            if got > 0:
                raise BlockingIOError(errno.EAGAIN, 'partly in page cache')
            raise CorruptBlock('truncated data')
    else:
        # pread fills a new bytes object without zeroing it first, as bytearray() would
        # (memset was 5% of the daemon's CPU on SSD-tier reads).
        buffer = os.pread(fd, hi - lo, header.data_offset + lo)
        if len(buffer) != hi - lo:
            raise CorruptBlock('truncated data')
    view = memoryview(buffer)
    for chunk in range(first, last + 1):
        piece = view[(chunk - first) * chunk_size:(chunk - first + 1) * chunk_size]
        if xxhash.xxh3_64_intdigest(piece) != header.hashes[chunk]:
            raise CorruptBlock(f'checksum mismatch in chunk {chunk}')
    return view[start - lo:start - lo + length]


def read_block_file(path, block_id, start, length, header=None, flags=0):
    """Open, check and read part of one block file: returns (header, data).

    Raises FileNotFoundError (not cached), CorruptBlock, or BlockingIOError with RWF_NOWAIT.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    try:
        if header is None:
            raw = bytearray(_ALIGN)
            got = os.preadv(fd, [raw], 0, flags)
            if flags and got < _ALIGN:
                raise BlockingIOError(errno.EAGAIN, 'header partly in page cache')
            header = parse_header(memoryview(raw)[:got], block_id)
        return header, read_verified(fd, header, start, length, flags)
    finally:
        os.close(fd)


# Cache folders (the parent of the block's 2-hex folder) whose file system refuses O_DIRECT
# (tmpfs, for one); learnt on the first write there. Worker threads may race to add the same one.
_no_direct_io: set[str] = set()


class _BouncePool:
    """Page-aligned buffers for O_DIRECT writes, reused (a new one would page-fault every page);
    as many as writes run at once (two writer tasks), a few kept."""

    def __init__(self, keep=4):
        self._free = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, size):
        with self._lock:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) >= size:
                    return buffer
        return mmap.mmap(-1, size)

    def give(self, buffer):
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)


_bounce = _BouncePool()


def _write_direct(fd, buffers):
    """Write header + data with O_DIRECT from a page-aligned copy, zero-padded to _ALIGN.

    Why: a buffered write copies every block into the page cache (27% of the daemon's CPU on a
    cold epoch; perf in bench/RESULTS.md) and makes the kernel cache each block twice, once in
    the file the reader opened and once in the block file. O_DIRECT sends the pages to the disk
    from our buffer; the copy into that reused buffer costs a fraction of the page-cache path.
    """
    header, data = buffers
    used = len(header) + len(data)
    total = (used + _ALIGN - 1) // _ALIGN * _ALIGN
    buffer = _bounce.take(total)
    try:
        buffer[:len(header)] = header
        buffer[len(header):used] = data
        buffer[used:total] = bytes(total - used)   # no bytes of an earlier block in the padding
        with memoryview(buffer) as view:
            written = 0
            while written < total:
                written += os.pwrite(fd, view[written:total], written)
    finally:
        _bounce.give(buffer)
    return total


def _open_for_write(tmp, folder, direct):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        return os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.open(tmp, flags, 0o600)


def write_block_file(path, block_id, data):
    """Write one block atomically (temporary file + rename). Returns the bytes used on disk."""
    buffers = encode_block(block_id, data)
    folder = os.path.dirname(path)
    tmp = f'{path}{TEMP_TAG}{time.monotonic_ns()}'
    cache_folder = os.path.dirname(folder)
    direct = cache_folder not in _no_direct_io
    try:
        fd = _open_for_write(tmp, folder, direct)
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        log.info('the file system of %s refuses O_DIRECT; block files are written through the '
                 'page cache', cache_folder)
        _no_direct_io.add(cache_folder)
        direct = False
        fd = _open_for_write(tmp, folder, direct)
    try:
        if direct:
            total = _write_direct(fd, buffers)
        else:
            total = sum(len(b) for b in buffers)
            written = os.writev(fd, buffers)
            while written < total:     # writev may be partial; finish with plain writes
                joined = b''.join(bytes(b) for b in buffers)
                written += os.write(fd, joined[written:])
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        return total
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def probe(folder):
    """Write, fsync, read back and remove a small file in `folder`: the disk answers when this
    returns. Returns whether the file system takes RWF_NOWAIT reads (ext4, xfs and btrfs do;
    FUSE, NFS and tmpfs do not). A disk that refuses writes (full, read-only) still answers."""
    path = os.path.join(folder, f'.probe.{os.getpid()}.{threading.get_ident()}')
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            return False
        raise
    try:
        try:
            os.write(fd, bytes(_ALIGN))
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
        try:
            os.preadv(fd, [bytearray(_ALIGN)], 0, os.RWF_NOWAIT)
            return True
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


def scan(blocks_dir):
    """List the block files on disk (name, size, mtime), deleting leftovers of interrupted
    writes. Runs in a worker thread at start, while the mount already serves. The daemon holds
    the cache folder's lock (cache/folder.py), so no other process writes here: every temporary
    file is a leftover, except those of this process's own writes under way meanwhile, which
    carry TEMP_TAG."""
    ours = TEMP_TAG
    found: list[tuple[str, int, float]] = []
    try:
        subdirs = list(os.scandir(blocks_dir))
    except FileNotFoundError:
        return found
    for subdir in subdirs:
        if not subdir.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(subdir.path):
            if entry.name.endswith(SUFFIX):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((subdir.name + '/' + entry.name, st.st_size, st.st_mtime))
            elif '.tmp' in entry.name and ours not in entry.name:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
    return found


def unlink_quietly(paths):
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning('could not remove cache block %s: %s', path, exc.strerror)


def disk_free(path):
    """(free bytes for us, filesystem size) of the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class DiskCounters:
    __slots__ = ('hits', 'writes', 'write_bytes', 'evictions', 'corrupt', 'write_errors',
                 'skipped_writes')

    hits: int
    writes: int
    write_bytes: int
    evictions: int
    corrupt: int
    write_errors: int
    skipped_writes: int

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


class DiskTier:
    """Index and policy of the block files (trio thread only; I/O goes through the functions
    above, in worker threads, or inline with RWF_NOWAIT)."""

    offline = False     # the disk stopped answering: no I/O is sent to it (go_offline)

    def __init__(self, folder, block_size, capacity, min_free_ratio, eviction):
        self.folder = os.path.join(folder, 'blocks')
        own_private_folder(self.folder)     # 0700, of the daemon's user, not a symlink
        self.block_size = block_size
        self.capacity = capacity
        self.min_free_ratio = min_free_ratio
        self.eviction = eviction            # 'lru' or 'none'
        self.counters = DiskCounters()
        self.used = 0
        self.index_ready = False
        self._index = OrderedDict()         # name -> bytes on disk, least recently used first
        self._full_until = 0.0              # admission paused after ENOSPC or free-space shortage
        self._warned = False

    def path(self, name):
        return os.path.join(self.folder, name)

    def name(self, block_id):
        return block_name(block_id, self.block_size)

    def may_hold(self, name):
        """False only when the block is certainly not on disk (the index is complete)."""
        return not self.index_ready or name in self._index

    def holds(self, name):
        """True when the index knows the block is on disk."""
        return name in self._index

    def touch(self, name):
        if name in self._index:
            self._index.move_to_end(name)

    def merge_scan(self, found):
        """Add the files found at start (oldest first) to the index, behind newer writes."""
        known = self._index
        older = OrderedDict()
        for name, size, _ in sorted(found, key=lambda item: item[2]):
            if name not in known:
                older[name] = size
                self.used += size
        older.update(known)
        self._index = older
        self.index_ready = True
        log.info('disk cache: %d blocks, %d bytes found in %s', len(older), self.used,
                 self.folder)

    def forget(self, name):
        size = self._index.pop(name, None)
        if size is not None:
            self.used -= size

    def corrupt(self, name):
        self.counters.corrupt += 1
        self.forget(name)
        log.warning('cache block %s failed its checksum; dropped, fetching it again', name)

    def admission(self, size):
        """Decide whether to write a block taking `size` bytes on disk; returns the names to
        evict first, or None when the block is not admitted. An admitted block's size is
        reserved at once, so that concurrent writers cannot overshoot the capacity together;
        `written` or `write_failed` settles the reservation."""
        if time.monotonic() < self._full_until:
            return None
        victims = []
        if self.used + size > self.capacity:
            if self.eviction == 'none':
                return None
            victims = self._pick_victims(self.used + size - self.capacity)
        self.used += size
        return victims

    def _pick_victims(self, needed):
        victims = []
        for name, size in self._index.items():
            if needed <= 0:
                break
            victims.append(name)
            needed -= size
        for name in victims:
            self.forget(name)
        self.counters.evictions += len(victims)
        return victims

    def written(self, name, size, reserved, free, total):
        """Record a finished write; returns names to evict to keep the minimum free space."""
        self.used -= reserved
        self.forget(name)            # the same block written twice replaces itself
        self._index[name] = size
        self.used += size
        self.counters.writes += 1
        self.counters.write_bytes += size
        shortage = int(self.min_free_ratio * total) - free
        if shortage <= 0:
            return []
        # Other programs (or we) ate the reserve: give space back, and admit nothing for a while.
        self._full_until = time.monotonic() + 10
        self._warn_once(f'free space on the cache disk is below {self.min_free_ratio:.0%}; '
                        'evicting blocks and pausing admission')
        return self._pick_victims(shortage)

    def start_full(self):
        """The cache disk was full at mount: serve the blocks there, admit none for now."""
        self._full_until = time.monotonic() + 30
        self._warn_once('cache disk is full at mount: the SSD tier serves the blocks it holds '
                        'and admits new ones once space frees; reads go to the store')

    def go_offline(self, reason):
        """The disk missed a deadline: the block cache sends it nothing more until a probe
        answers (one warning per episode)."""
        if not self.offline:
            self.offline = True
            self._offline_since = time.monotonic()
            log.warning('SSD tier offline: %s; reads continue from memory and the store, and the '
                        'disk is probed again every %.0f s', reason, PROBE_INTERVAL)

    def back_online(self):
        self.offline = False
        log.info('SSD tier back online after %.0f s', time.monotonic() - self._offline_since)

    def write_abandoned(self, reserved):
        """A write that missed its deadline: settle its reservation. (Its thread may still
        finish it; the next start's scan finds such a file.)"""
        self.used -= reserved

    def write_failed(self, reserved, exc):
        self.used -= reserved
        self.counters.write_errors += 1
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            self._full_until = time.monotonic() + 30
            self._warn_once(f'cache disk refuses writes ({exc.strerror}); reads continue from '
                            'the store, admission paused')
        else:
            self._warn_once(f'cache write failed: {exc}; reads continue from the store')

    def _warn_once(self, message):
        # one warning per condition, not one per block
        if not self._warned:
            log.warning('%s', message)
            self._warned = True
        else:
            log.debug('%s', message)
