"""FROZEN REFERENCE: the object-per-file namespace.py of cachefs before the compact tree (issue 13).

tests/test_compact_tree.py builds this tree and the compact `cachefs.namespace` tree from the same
listings and checks that every lookup, getattr, readdir and tree_changes result is equal. It is a
copy, not `git show HEAD~n:...` at test time, so that the check does not depend on the repository's
history. Do not edit it to follow later changes of namespace.py: it is the behaviour to keep.
"""
# ruff: noqa
# mypy: ignore-errors

# The original module docstring:
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
  a marker with content is still only a folder.
Inode numbers come from a hash of the path (and, for files, the ETag), so they are stable across
remounts and refreshes while an object is unchanged, and a replaced object gets a new inode: the
kernel's page cache of the old version then stays with the old inode, which handles opened before
the change keep reading, and new opens see only the new version.
"""

import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable

from cachefs.ufs.base import ObjectInfo

log = logging.getLogger(__name__)

ROOT_INODE = 1
_NAME_MAX = 255


class Node:
    """A file or a folder. Folders have `children` (name -> Node) and `sorted_names`."""

    __slots__ = ('inode', 'name', 'parent', 'key', 'size', 'etag', 'mtime_ns', 'children',
                 'sorted_names')

    def __init__(self, inode: int, name: bytes, parent: int, key: str, size: int = 0,
                 etag: str = '', mtime_ns: int = 0, is_dir: bool = False) -> None:
        self.inode = inode
        self.name = name              # bytes, as FUSE wants it
        self.parent = parent          # parent inode (the root is its own parent)
        self.key = key                # store key relative to the prefix ('' for the root)
        self.size = size
        self.etag = etag
        self.mtime_ns = mtime_ns
        self.children: dict[bytes, Node] | None = {} if is_dir else None
        self.sorted_names: list[bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class Tree:
    def __init__(self, nodes: dict[int, Node], file_count: int, dir_count: int,
                 total_bytes: int) -> None:
        self.nodes = nodes            # inode -> Node
        self.root = nodes[ROOT_INODE]
        self.file_count = file_count
        self.dir_count = dir_count
        self.total_bytes = total_bytes

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def lookup(self, parent_inode: int, name: bytes) -> Node | None:
        parent = self.nodes.get(parent_inode)
        if parent is None or parent.children is None:
            return None
        return parent.children.get(name)

    def by_key(self, key: str) -> Node | None:
        """The node for a store key (slow: walks from the root; for tools, not the read path)."""
        node = self.root
        for part in key.strip('/').split('/') if key.strip('/') else ():
            child = node.children.get(os.fsencode(part)) if node.children is not None else None
            if child is None:
                return None
            node = child
        return node


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be a POSIX path, or None when it can."""
    if '\0' in key:
        return 'contains a NUL byte'
    parts = key[:-1].split('/') if key.endswith('/') else key.split('/')
    for part in parts:
        if part in ('', '.', '..'):
            return 'has an empty, "." or ".." path segment'
        if len(os.fsencode(part)) > _NAME_MAX:
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
            inode = int.from_bytes(digest, 'little') & 0x7FFF_FFFF_FFFF_FFFF
            if inode > ROOT_INODE and inode not in self.used:
                self.used.add(inode)
                return inode
            counter += 1
            salt = counter.to_bytes(4, 'little')


def build_tree(objects: Iterable[ObjectInfo], listed_at_ns: int = 0) -> Tree:
    """Build a `Tree` from an iterable of `ufs.base.ObjectInfo`."""
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def skip(key: str, why: str) -> None:
        problems[why] += 1
        examples.setdefault(why, key)

    files = []
    folders = set()
    for obj in objects:
        key = obj.key
        if key in ('', '/'):
            continue                      # the prefix's own marker
        why = _key_problem(key)
        if why:
            skip(key, why)
            continue
        if key.endswith('/'):
            key = key[:-1]
            folders.add(key)
        else:
            files.append(obj)
        # every proper prefix of a key is a folder
        cut = key.rfind('/')
        while cut > 0:
            prefix = key[:cut]
            if prefix in folders:
                break
            folders.add(prefix)
            cut = prefix.rfind('/')

    allocator = _InodeAllocator()
    root = Node(ROOT_INODE, b'', ROOT_INODE, '', mtime_ns=listed_at_ns, is_dir=True)
    nodes = {ROOT_INODE: root}
    dirs_by_key = {'': root}
    # Sorted, so that inode collisions and every other choice are independent of listing order.
    for folder in sorted(folders):
        parent_key, _, name = folder.rpartition('/')
        parent = dirs_by_key[parent_key]
        node = Node(allocator.allocate(os.fsencode(folder) + b'/'), os.fsencode(name),
                    parent.inode, folder + '/', mtime_ns=listed_at_ns, is_dir=True)
        assert parent.children is not None          # dirs_by_key holds folders only
        parent.children[node.name] = node
        nodes[node.inode] = node
        dirs_by_key[folder] = node

    total_bytes = 0
    file_count = 0
    files.sort(key=lambda obj: obj.key)
    for obj in files:
        if obj.key in folders:
            skip(obj.key, 'is both an object and a folder prefix (the folder is shown)')
            continue
        parent_key, _, name = obj.key.rpartition('/')
        parent = dirs_by_key[parent_key]
        identity = os.fsencode(obj.key) + b'\0' + obj.etag.encode()
        node = Node(allocator.allocate(identity), os.fsencode(name), parent.inode,
                    obj.key, obj.size, obj.etag, obj.mtime_ns)
        assert parent.children is not None
        parent.children[node.name] = node
        nodes[node.inode] = node
        total_bytes += obj.size
        file_count += 1

    for node in dirs_by_key.values():
        children = node.children
        assert children is not None
        node.sorted_names = sorted(children)
        if children:
            node.mtime_ns = max(child.mtime_ns for child in children.values()) or listed_at_ns

    for why, count in sorted(problems.items()):
        log.warning('skipped %d key(s) that %s, e.g. %r', count, why, examples[why])
    return Tree(nodes, file_count, len(dirs_by_key), total_bytes)


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
    for inode, node in old.nodes.items():
        fresh = new.nodes.get(inode)
        if fresh is None or fresh.key != node.key:
            entries.append((node.parent, node.name))
        elif node.is_dir and fresh.sorted_names != node.sorted_names:
            changed.append(inode)
    for inode, node in new.nodes.items():
        if inode not in old.nodes and node.parent in old.nodes:
            entries.append((node.parent, node.name))
    return changed, list(dict.fromkeys(entries))     # a replaced name is both gone and new
