"""The directory tree built once from a store listing: inodes, names and sizes.

After the mount is ready every lookup, getattr and readdir is answered from this tree alone;
the store is never asked for metadata on the read path.

Keys that cannot be POSIX paths are dealt with here, deterministically, whatever their order in
the listing, and each kind is logged once with a count:
- a key with an empty, "." or ".." segment ("a//b", "/a", "a/./b"), a NUL byte, or a segment over
  255 bytes is skipped;
- a key that is both an object and a prefix of other keys ("a" and "a/b"): the folder is shown and
  the object hidden (the same choice as mountpoint-s3);
- a directory marker ("a/", usually empty) makes the folder exist even when nothing is under it;
  a marker with content is still only a folder;
- a key listed twice: the later entry of the listing is shown.
Inode numbers come from a hash of the path (and, for files, the ETag), so they are stable across
remounts and refreshes while an object is unchanged, and a replaced object gets a new inode: the
kernel's page cache of the old version then stays with the old inode, which handles opened before
the change keep reading, and new opens see only the new version.

Memory: a bucket may hold millions of files, so the tree keeps no Python object per file but its
name. Each folder (a `Folder`) holds its children in columns ordered by name bytes: a list of
names, one `array('q')` of inode, size and mtime side by side, and the ETags packed (16 raw bytes
each when every ETag of the folder is 32 hex digits of one case, else one string and offsets).
One sorted `array('q')` of every file inode, with the file's folder and index beside it, answers
getattr by inode in a binary search. About 140 bytes of RSS per file in all at 1.28 million
files, against about 290 for a `Node` per file (bench/tree_cost.py).
A file's `Node` is made on demand (a tree keeps the last 4,096 it made, for the getattr and open
that follow a lookup; `fuse.operations` keeps those of open files and retired inodes); folders
keep theirs. The price: a lookup or getattr costs a few microseconds more than a dict look-up
(bench/tree_cost.py), small beside a FUSE round trip.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

from .ufs.base import ObjectInfo

log = logging.getLogger(__name__)

ROOT_INODE = 1
_NAME_MAX = 255
_INODE_MASK = 0x7FFF_FFFF_FFFF_FFFF
_INDEX_BITS = 32                  # a file's place: folder ordinal << 32 | index in the folder
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_HEX_ETAG = 32                    # an MD5 ETag: 32 lowercase hex digits, kept as 16 bytes
_ZERO_ETAG = '0' * _HEX_ETAG       # a subfolder's place among them
_RECENT_NODES = 4096              # file nodes a tree keeps after making them (Tree._recent)
_BOTH = 'is both an object and a folder prefix (the folder is shown)'


class Node:
    """A file or a folder. Folders have `children` (a `Folder`: name -> Node) and `sorted_names`.

    A folder's Node lives as long as its tree; a file's is made when asked for and holds a copy
    of its attributes, so one kept by the FUSE layer (an open file, a retired inode) stays valid.
    """

    __slots__ = ('inode', 'name', 'parent', 'key', 'size', 'etag', 'mtime_ns', 'children',
                 'sorted_names')

    def __init__(self, inode: int, name: bytes, parent: int, key: str, size: int = 0,
                 etag: str = '', mtime_ns: int = 0) -> None:
        self.inode = inode
        self.name = name              # bytes, as FUSE wants it
        self.parent = parent          # parent inode (the root is its own parent)
        self.key = key                # store key relative to the prefix ('' for the root)
        self.size = size
        self.etag = etag
        self.mtime_ns = mtime_ns
        self.children: Folder | None = None
        self.sorted_names: list[bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class Folder(Mapping[bytes, Node]):
    """The children of one folder, in columns ordered by name bytes (the readdir order).

    A subfolder's entry has size -1; its Node is the subfolder's own (`subdirs`).
    """

    __slots__ = ('node', 'names', 'cols', 'hex_etags', 'hex_upper', 'etags', 'etag_ends',
                 'subdirs', 'odd_keys')

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: list[bytes] = []
        # inode, size and mtime of each entry side by side: one cache line for a getattr
        self.cols = array('q')
        self.hex_etags: bytes | None = None       # 16 bytes per entry, or None:
        self.hex_upper = False                    # (their hex digits are capitals)
        self.etags = ''                           # all ETags joined, and where each ends
        self.etag_ends = array('q')
        self.subdirs: dict[int, Folder] = {}      # index -> subfolder
        self.odd_keys: dict[int, str] = {}        # index -> key, where name + folder key differ

    def at(self, index: int) -> Node:
        """The Node of the entry at `index` (readdir offsets are these indexes)."""
        cols = self.cols
        size = cols[3 * index + 1]
        if size < 0:
            return self.subdirs[index].node
        # key_at and etag_at inlined: this is every lookup, getattr and readdir entry
        node = self.node
        name = self.names[index]
        key = self.odd_keys.get(index) if self.odd_keys else None
        if key is None:
            key = node.key + name.decode('utf-8', 'surrogateescape')
        hex_etags = self.hex_etags
        if hex_etags is not None:
            etag = hex_etags[index * 16:index * 16 + 16].hex()
            if self.hex_upper:
                etag = etag.upper()
        else:
            etag = self.etag_at(index)
        return Node(cols[3 * index], name, node.inode, key, size, etag, cols[3 * index + 2])

    @property
    def inodes(self) -> array:
        return self.cols[0::3]

    @property
    def sizes(self) -> array:
        return self.cols[1::3]

    @property
    def mtimes(self) -> array:
        return self.cols[2::3]

    def key_at(self, index: int) -> str:
        key = self.odd_keys.get(index)
        if key is None:
            key = self.node.key + self.names[index].decode('utf-8', 'surrogateescape')
        return key

    def etag_at(self, index: int) -> str:
        if self.hex_etags is not None:
            etag = self.hex_etags[index * 16:index * 16 + 16].hex()
            return etag.upper() if self.hex_upper else etag
        ends = self.etag_ends
        return self.etags[ends[index - 1] if index else 0:ends[index]]

    def index(self, name: bytes) -> int:
        """The index of `name`, or -1."""
        names = self.names
        i = bisect.bisect_left(names, name)
        return i if i < len(names) and names[i] == name else -1

    def get(self, name: bytes, default: Node | None = None) -> Node | None:  # type: ignore[override]
        i = self.index(name)
        return self.at(i) if i >= 0 else default

    def __getitem__(self, name: bytes) -> Node:
        i = self.index(name)
        if i < 0:
            raise KeyError(name)
        return self.at(i)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and self.index(name) >= 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Nodes(Mapping[int, Node]):
    """inode -> Node of a tree, every Node made on demand."""

    __slots__ = ('tree',)

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def __getitem__(self, inode: int) -> Node:
        node = self.tree.get(inode)
        if node is None:
            raise KeyError(inode)
        return node

    def __contains__(self, inode: object) -> bool:
        return isinstance(inode, int) and self.tree.has(inode)

    def __iter__(self) -> Iterator[int]:
        yield from self.tree.folders
        yield from self.tree.file_inodes

    def __len__(self) -> int:
        return self.tree.dir_count + self.tree.file_count


class Tree:
    def __init__(self, folders: dict[int, Folder], ordered: list[Folder], file_inodes: array,
                 file_places: array, total_bytes: int) -> None:
        self.folders = folders            # folder inode -> Folder
        self.ordered = ordered            # the folders by ordinal (for file_places)
        self.file_inodes = file_inodes    # every file inode, sorted
        self.file_places = file_places    # beside each: folder ordinal << 32 | index
        self.root = folders[ROOT_INODE].node
        self.file_count = len(file_inodes)
        self.dir_count = len(folders)
        self.total_bytes = total_bytes
        self.nodes: Mapping[int, Node] = _Nodes(self)
        # The nodes made last: the kernel asks for an inode again right after its lookup
        # (getattr, open), and those answers then cost a dict look-up as they did when every
        # file had its Node. Bounded, so nothing stays per file.
        self._recent: dict[int, Node] = {}

    def _place(self, inode: int) -> int:
        inodes = self.file_inodes
        i = bisect.bisect_left(inodes, inode)
        return self.file_places[i] if i < len(inodes) and inodes[i] == inode else -1

    def get(self, inode: int) -> Node | None:
        node = self._recent.get(inode)
        if node is not None:
            return node
        folder = self.folders.get(inode)
        if folder is not None:
            return folder.node
        inodes = self.file_inodes
        i = bisect.bisect_left(inodes, inode)
        if i < len(inodes) and inodes[i] == inode:
            place = self.file_places[i]
            return self._remember(self.ordered[place >> _INDEX_BITS].at(place & _INDEX_MASK))
        return None

    def _remember(self, node: Node) -> Node:
        recent = self._recent
        if len(recent) >= _RECENT_NODES:
            recent.clear()
        recent[node.inode] = node
        return node

    def has(self, inode: int) -> bool:
        return inode in self.folders or self._place(inode) >= 0

    def lookup(self, parent_inode: int, name: bytes) -> Node | None:
        folder = self.folders.get(parent_inode)
        if folder is None:
            return None
        i = folder.index(name)
        return self._remember(folder.at(i)) if i >= 0 else None

    def by_key(self, key: str) -> Node | None:
        """The node for a store key (walks from the root; for tools, not the read path)."""
        node: Node | None = self.root
        for part in key.strip('/').split('/') if key.strip('/') else ():
            children = node.children if node is not None else None
            node = children.get(os.fsencode(part)) if children is not None else None
        return node


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be a POSIX path, or None when it can."""
    if '\0' in key:
        return 'contains a NUL byte'
    parts = key[:-1].split('/') if key.endswith('/') else key.split('/')
    if '' in parts or '.' in parts or '..' in parts:
        return 'has an empty, "." or ".." path segment'
    if key.isascii():
        if len(max(parts, key=len)) > _NAME_MAX:
            return 'has a name longer than 255 bytes'
    elif any(len(part.encode('utf-8', 'surrogateescape')) > _NAME_MAX for part in parts):
        return 'has a name longer than 255 bytes'
    return None


class _InodeAllocator:
    """Inode = 63-bit hash of the path; on a (rare) collision, rehash with a counter."""

    def __init__(self) -> None:
        self.used = {ROOT_INODE}

    def allocate(self, path: bytes) -> int:
        salt = b''
        counter = 0
        while True:
            digest = hashlib.blake2b(salt + path, digest_size=8).digest()
            inode = int.from_bytes(digest, 'little') & _INODE_MASK
            if inode > ROOT_INODE and inode not in self.used:
                self.used.add(inode)
                return inode
            counter += 1
            salt = counter.to_bytes(4, 'little')


def _encode(text: str) -> bytes:
    return text.encode('utf-8', 'surrogateescape')


def build_tree(objects: Iterable[ObjectInfo], listed_at_ns: int = 0) -> Tree:
    """Build a `Tree` from an iterable of `ufs.base.ObjectInfo`."""
    objects = objects if isinstance(objects, list) else list(objects)
    return build_tree_from_columns([o.key for o in objects], [o.size for o in objects],
                                   [o.etag for o in objects], [o.mtime_ns for o in objects],
                                   listed_at_ns)


def build_tree_from_columns(keys: Sequence[str], sizes: Sequence[int], etags: Sequence[str],
                            mtimes: Sequence[int], listed_at_ns: int = 0) -> Tree:
    """Build a `Tree` from a listing in columns: item i of each is object i (as the saved
    listing holds it, `cache.listing.Columns`), so that a remount makes no object per file."""
    if not len(keys) == len(sizes) == len(etags) == len(mtimes):
        raise ValueError('columns of different lengths')
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def skip(key: str, why: str) -> None:
        problems[why] += 1
        examples.setdefault(why, key)

    # 1. the files of each folder, as indexes into the columns (by folder key without its
    # slash, '' for the root); markers
    files_in: dict[str, list[int]] = {}
    markers = set()
    for i, key in enumerate(keys):
        if key in ('', '/'):
            continue                      # the prefix's own marker
        # the usual key needs no closer look: short, ASCII, no NUL, no empty or dot segment
        if not (len(key) <= _NAME_MAX and key.isascii() and '\0' not in key and '//' not in key
                and '/.' not in key and key[0] not in './'):
            why = _key_problem(key)
            if why:
                skip(key, why)
                continue
        if key[-1] == '/':
            markers.add(key[:-1])
            continue
        parent = key.rpartition('/')[0]
        group = files_in.get(parent)
        if group is None:
            group = files_in[parent] = []
        group.append(i)

    # 2. every folder, and its subfolders: every proper prefix of a key is a folder
    folder_keys = {''}
    for folder in (*files_in, *markers):
        while folder not in folder_keys:
            folder_keys.add(folder)
            folder = folder.rpartition('/')[0]
    subfolders: dict[str, list[str]] = {folder: [] for folder in folder_keys}
    for folder in folder_keys:
        if folder:
            subfolders[folder.rpartition('/')[0]].append(folder)

    # 3. each folder's columns; folders sorted, so that every choice is independent of the
    # listing's order
    blake2b = hashlib.blake2b
    from_bytes = int.from_bytes
    folders: dict[str, Folder] = {}
    total_bytes = 0
    for folder_key in sorted(folder_keys):
        key = folder_key + '/' if folder_key else ''
        node = Node(0, _encode(folder_key.rpartition('/')[2]), 0, key, mtime_ns=listed_at_ns)
        if folder_key:
            node.inode = from_bytes(blake2b(_encode(key), digest_size=8).digest(),
                                    'little') & _INODE_MASK
        else:
            node.inode = node.parent = ROOT_INODE
        table = Folder(node)
        node.children = table
        folders[folder_key] = table

        cut = len(key)
        by_name: dict[bytes, int] = {}
        for i in files_in.pop(folder_key, ()):     # freed as it goes: less fragmentation
            # a key listed twice: the later one
            by_name[keys[i][cut:].encode('utf-8', 'surrogateescape')] = i
        for sub in subfolders[folder_key]:
            name = _encode(sub[cut:])
            if by_name.get(name, -1) >= 0:
                skip(sub, _BOTH)
            by_name[name] = -1
        names = sorted(by_name)
        entries = [by_name[name] for name in names]
        files = [i for i in entries if i >= 0]
        file_keys = [keys[i] for i in files]
        file_etags = [etags[i] for i in files]
        table.names = names
        node.sorted_names = names
        if len(files) == len(entries):              # no subfolder among them: the usual case
            entry_sizes = [sizes[i] for i in files]
            mtimes_col = array('q', [mtimes[i] for i in files])
            entry_etags: list[str | None] = file_etags  # type: ignore[assignment]
            inodes = [from_bytes(blake2b((k + '\0' + e).encode('utf-8', 'surrogateescape'),
                                         digest_size=8).digest(), 'little') & _INODE_MASK
                      for k, e in zip(file_keys, file_etags)]
        else:
            entry_sizes = [-1 if i < 0 else sizes[i] for i in entries]
            mtimes_col = array('q', [listed_at_ns if i < 0 else mtimes[i] for i in entries])
            entry_etags = [None if i < 0 else etags[i] for i in entries]
            inodes = [0 if i < 0 else from_bytes(blake2b(
                (keys[i] + '\0' + etags[i]).encode('utf-8', 'surrogateescape'),
                digest_size=8).digest(), 'little') & _INODE_MASK
                for i in entries]
        cols = table.cols = array('q', bytes(24 * len(entries)))
        cols[1::3] = array('q', entry_sizes)
        cols[2::3] = mtimes_col
        cols[0::3] = array('q', inodes)
        _pack_etags(table, entry_etags)
        if not all(map(str.isascii, file_keys)):
            for index, i in enumerate(entries):
                if i >= 0 and not keys[i].isascii() and table.key_at(index) != keys[i]:
                    table.odd_keys[index] = keys[i]
        total_bytes += sum(entry_sizes) + entry_sizes.count(-1)
        if mtimes_col:
            node.mtime_ns = max(mtimes_col) or listed_at_ns

    # 4. subfolders' places in their parents, and inodes
    for folder_key, table in folders.items():
        if folder_key:
            above = folders[folder_key.rpartition('/')[0]]
            above.subdirs[above.index(table.node.name)] = table
    ordered = [folders[key] for key in sorted(folders)]
    _set_subfolder_inodes(ordered)
    file_inodes, file_places = _file_index(ordered)
    if not _inodes_unique(ordered, file_inodes):
        _allocate_in_order(ordered)
        _set_subfolder_inodes(ordered)
        file_inodes, file_places = _file_index(ordered)

    for why, count in sorted(problems.items()):
        log.warning('skipped %d key(s) that %s, e.g. %r', count, why, examples[why])
    return Tree({table.node.inode: table for table in ordered}, ordered, file_inodes,
                file_places, total_bytes)


def _pack_etags(table: Folder, etags: list[str | None]) -> None:
    """16 bytes per entry when every ETag is 32 hex digits of one case, else one string."""
    hex_etags = [_ZERO_ETAG if etag is None else etag for etag in etags]
    joined = ''.join(hex_etags)
    if len(joined) == _HEX_ETAG * len(etags) and all(len(etag) == _HEX_ETAG for etag in hex_etags):
        try:
            packed = bytes.fromhex(joined)
        except ValueError:
            packed = b''
        if packed.hex() == joined:
            table.hex_etags = packed
            return
        if packed.hex().upper() == joined:          # OSS writes its MD5 ETags in capitals
            table.hex_etags = packed
            table.hex_upper = True
            return
    table.etags = ''.join(etag or '' for etag in etags)
    ends, end = [], 0
    for etag in etags:
        end += len(etag or '')
        ends.append(end)
    table.etag_ends = array('q', ends)


def _set_subfolder_inodes(ordered: list[Folder]) -> None:
    for table in ordered:
        for index, sub in table.subdirs.items():
            table.cols[3 * index] = sub.node.inode
            sub.node.parent = table.node.inode


def _file_index(ordered: list[Folder]) -> tuple[array, array]:
    """Every file inode, sorted, and beside each the file's place (folder ordinal, index)."""
    places = sorted(
        inode << 64 | ordinal << _INDEX_BITS | index
        for ordinal, table in enumerate(ordered)
        for index, (inode, size) in enumerate(zip(table.inodes, table.sizes)) if size >= 0)
    low = (1 << 64) - 1
    return array('q', [place >> 64 for place in places]), array('q', [place & low
                                                                       for place in places])


def _inodes_unique(ordered: list[Folder], file_inodes: array) -> bool:
    """Whether the plain hashes gave every folder and file an inode of its own (almost always:
    a collision among a million 63-bit hashes has odds of about 1 in 10 million)."""
    folder_inodes = {table.node.inode for table in ordered}
    if len(folder_inodes) < len(ordered) or (file_inodes and file_inodes[0] <= ROOT_INODE):
        return False
    if any(a == b for a, b in zip(file_inodes, file_inodes[1:])):
        return False
    for inode in folder_inodes:
        i = bisect.bisect_left(file_inodes, inode)
        if i < len(file_inodes) and file_inodes[i] == inode:
            return False
    return min(folder_inodes) == ROOT_INODE         # the root's; no other folder got 0 or 1


def _allocate_in_order(ordered: list[Folder]) -> None:
    """Hand out the inodes again with rehashing on collisions: folders by key, then files by
    key, the order that has always decided who keeps the plain hash."""
    allocator = _InodeAllocator()
    for table in ordered[1:]:
        table.node.inode = allocator.allocate(_encode(table.node.key))
    files = sorted((table.key_at(index), table, index)
                   for table in ordered
                   for index, size in enumerate(table.sizes) if size >= 0)
    for key, table, index in files:
        identity = _encode(key) + b'\0' + table.etag_at(index).encode('utf-8', 'surrogateescape')
        table.cols[3 * index] = allocator.allocate(identity)


def file_mode(node: Node) -> int:
    return (stat.S_IFDIR | 0o555) if node.is_dir else (stat.S_IFREG | 0o444)


def tree_changes(old: Tree, new: Tree) -> tuple[list[int], list[tuple[int, bytes]]]:
    """What the kernel must forget when `new` replaces `old`.

    Returns (folder inodes whose list of names changed, (parent inode, name) entries to forget:
    names that are gone, now name another inode, or are new). A replaced object has a new inode,
    so it shows up as an entry to forget, not as changed data; a new name may sit in the kernel
    as a cached negative lookup, which must go too.
    """
    changed: list[int] = []
    entries: list[tuple[int, bytes]] = []
    for inode, table in old.folders.items():
        node = table.node
        fresh = new.folders.get(inode)
        same_folder = fresh is not None and fresh.node.key == node.key
        if not same_folder and inode != ROOT_INODE:
            entries.append((node.parent, node.name))
        elif fresh is not None and fresh.names != table.names:
            changed.append(inode)
        if fresh is not None and same_folder and _same_children(table, fresh):
            continue
        inodes = table.inodes
        for index, size in enumerate(table.sizes):
            if size >= 0:
                now = new.get(inodes[index])
                if now is None or now.key != table.key_at(index):
                    entries.append((inode, table.names[index]))
    for inode, table in new.folders.items():
        node = table.node
        if not old.has(inode) and old.has(node.parent) and inode != ROOT_INODE:
            entries.append((node.parent, node.name))
        before = old.folders.get(inode)
        if before is not None and before.node.key == node.key and _same_children(before, table):
            continue
        if not old.has(inode):
            continue
        inodes = table.inodes
        for index, size in enumerate(table.sizes):
            if size >= 0 and not old.has(inodes[index]):
                entries.append((inode, table.names[index]))
    return changed, list(dict.fromkeys(entries))     # a replaced name is both gone and new


def _same_children(a: Folder, b: Folder) -> bool:
    """The same names, inodes and keys (so every child is in both trees, unchanged)."""
    return a.names == b.names and a.inodes == b.inodes and a.odd_keys == b.odd_keys
