"""The compact tree answers exactly as the object-per-file tree did (pure logic: no mount).

`support.reference_namespace` is a frozen copy of namespace.py before the compact tree. Both are
built from the same listings; every folder is walked through the real FUSE handlers
(`Operations`: lookup, getattr, readdir with its offsets, open + read for the key and ETag) on the
compact tree and compared with the reference tree's nodes, and `tree_changes` between two
listings is compared with the reference's.
"""

import os
import random

import pyfuse3
import pytest
import trio

from cachefs import namespace
from cachefs.cache import listing as saved_listing
from cachefs.demo.dataset import edge_case_layout
from cachefs.fuse.operations import Operations
from cachefs.namespace import ROOT_INODE, build_tree, build_tree_from_columns, tree_changes
from cachefs.ufs.base import ObjectInfo
from support import reference_namespace as reference

HEX = '0123456789abcdef'

#: the keys of test_security's odd-names test, plus what SeaweedFS would not store
ODD_KEYS = ['ctl\x01\x1f.bin', 'tab\tand\nnewline', 'del\x7f', 'both', 'both/child', 'a//b',
            'trail/', '//lead', 'back\\slash', 'sp ace %41+#?', 'ok', 'x/./y', 'x/../../escape',
            '../escape', '.', 'n' * 300, 'ok-' + 'n' * 252, '/', '', 'nul\0byte', 'é' * 128,
            'é' * 127, 'marker/', 'marker/inside/', 'file-then-marker', 'file-then-marker/',
            'deep/both', 'deep/both/x/y', 'non-utf8-\udcff', 'not-roundtrip-\udcc3\udca9',
            'dir-\udcc3\udca9/file', 'emoji 🚀/x', 'trail//', 'a/.', 'a/..']


class KeyEtagCache:
    """Reads answer `key@etag`, so a read shows which object a handle was opened on."""
    block_size = 1 << 20

    async def read(self, key, etag, size, offset, length):
        return f'{key}@{etag}'.encode('utf-8', 'surrogateescape')

    def cached_blocks(self, key, etag, size):
        return 0, 0


def etag_for(rng, style):
    if style == 'hex':
        return ''.join(rng.choice(HEX) for _ in range(32))
    return rng.choice(['', 'abc-2', '"quoted"', 'ABCDEF0123456789ABCDEF0123456789',
                       ''.join(rng.choice(HEX) for _ in range(32)) + '-12'])


def listing(keys, seed=0, odd_etags=0.1):
    rng = random.Random(seed)
    return [ObjectInfo(key, rng.randrange(0, 1 << 40), etag_for(
        rng, 'odd' if rng.random() < odd_etags else 'hex'), rng.randrange(-5, 1 << 62))
        for key in keys]


def edge_listing():
    rng = random.Random(8)
    oss = [ObjectInfo(f'oss/o{i}', i, ''.join(rng.choice(HEX) for _ in range(32)).upper(), i)
           for i in range(20)]
    oss += [ObjectInfo(f'md5/m{i}', i, etag_for(rng, 'hex'), i) for i in range(20)]
    return listing([rel for rel, _size in edge_case_layout(1 << 20)] + ODD_KEYS, seed=7) + oss


def random_keys(seed, count=600):
    rng = random.Random(seed)
    parts = ['a', 'b', 'B', 'c d', 'ä', 'x.jpg', '\udcfe', 'n01440764', 'z' * 40, '_', '0']
    keys = set()
    while len(keys) < count:
        depth = rng.choice([1, 1, 2, 2, 3, 4])
        key = '/'.join(rng.choice(parts) + (str(rng.randrange(9)) if rng.random() < .6 else '')
                       for _ in range(depth))
        keys.add(key + '/' if rng.random() < 0.05 else key)
    return sorted(keys)


def attributes(attrs):
    return (attrs.st_ino, attrs.st_mode, attrs.st_nlink, attrs.st_size, attrs.st_blocks,
            attrs.st_mtime_ns, attrs.st_atime_ns, attrs.st_ctime_ns)


def operations(tree):
    return Operations(tree, KeyEtagCache(), entry_timeout=1, attr_timeout=1, uid=0, gid=0)


async def readdir(ops, inode, start=0):
    fh = await ops.opendir(inode, None)
    entries = []

    def reply(token, name, attrs, next_id):
        entries.append((name, attributes(attrs), next_id))
        return True
    real = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = reply
    try:
        await ops.readdir(fh, start, None)
    finally:
        pyfuse3.readdir_reply = real
    return entries


def assert_same_answers(objects):
    """Every lookup, getattr, readdir and read of the compact tree equals the reference's."""
    ref = reference.build_tree(objects, 123)
    tree = build_tree(objects, 123)
    assert (tree.file_count, tree.dir_count, tree.total_bytes) == \
        (ref.file_count, ref.dir_count, ref.total_bytes)
    assert len(tree.nodes) == len(ref.nodes)
    assert sorted(tree.nodes) == sorted(ref.nodes)
    ops, ref_ops = operations(tree), operations(ref)

    async def check():
        for inode, node in ref.nodes.items():
            assert attributes(await ops.getattr(inode)) == attributes(ref_ops._attributes(node))
            mine = tree.get(inode)
            assert (mine.name, mine.parent, mine.key, mine.size, mine.etag, mine.mtime_ns,
                    mine.is_dir) == (node.name, node.parent, node.key, node.size, node.etag,
                                     node.mtime_ns, node.is_dir)
            if not node.is_dir:
                handle = await ops.open(inode, 0, None)
                assert await ops.read(handle.fh, 0, 1 << 20) == \
                    f'{node.key}@{node.etag}'.encode('utf-8', 'surrogateescape')
                await ops.release(handle.fh)
                continue
            names = node.sorted_names
            expected = [(name, attributes(ref_ops._attributes(node.children[name])), index + 1)
                        for index, name in enumerate(names)]
            assert await readdir(ops, inode) == expected
            for start in {0, 1, len(names) // 2, len(names) - 1, len(names)}:
                if start >= 0:
                    assert await readdir(ops, inode, start) == expected[start:]
            for name, child in node.children.items():
                assert attributes(await ops.lookup(inode, name, None)) == \
                    attributes(ref_ops._attributes(child))
                assert tree.by_key(child.key).inode == ref.by_key(child.key).inode
            for missing in (b'', b'missing', b'\xff\xff', (names[-1] + b'~') if names else b'~'):
                if missing not in node.children:
                    assert (await ops.lookup(inode, missing, None)).st_ino == 0
            assert attributes(await ops.lookup(inode, b'..', None)) == \
                attributes(ref_ops._attributes(ref.nodes[node.parent]))
    trio.run(check)
    return tree, ref


def sorted_changes(changes):
    changed, entries = changes
    assert len(set(entries)) == len(entries)
    return sorted(changed), sorted(entries)


def test_edge_case_and_odd_keys_answer_as_the_reference_tree():
    tree, ref = assert_same_answers(edge_listing())
    assert tree.lookup(ROOT_INODE, b'both').is_dir
    assert tree.by_key('not-roundtrip-\udcc3\udca9').key == 'not-roundtrip-\udcc3\udca9'
    packed = {os.fsdecode(table.node.name): table.hex_upper for table in tree.folders.values()
              if table.hex_etags is not None}
    # ETags of 32 hex digits take 16 bytes; a folder with other ETags keeps them as they are
    assert packed['oss'] and not packed['md5'] and 'many' not in packed


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_random_nested_listings_answer_as_the_reference_tree(seed):
    assert_same_answers(listing(random_keys(seed), seed=seed, odd_etags=seed / 5))


def test_listing_order_changes_nothing():
    objects = listing(random_keys(4), seed=4)
    shuffled = objects[:]
    random.Random(4).shuffle(shuffled)
    first, second = build_tree(objects), build_tree(shuffled)
    assert sorted((i, n.key, n.etag) for i, n in first.nodes.items()) == \
        sorted((i, n.key, n.etag) for i, n in second.nodes.items())


def mutated(objects, seed):
    rng = random.Random(seed)
    out = []
    for obj in objects:
        roll = rng.random()
        if roll < 0.1:
            continue                                                  # deleted
        if roll < 0.2:
            obj = ObjectInfo(obj.key, obj.size + 1, etag_for(rng, 'hex'), obj.mtime_ns)  # replaced
        out.append(obj)
    out += listing([f'{key}/new{seed}' for key in random_keys(seed + 100, 40)]
                   + [f'fresh{seed}/{i}' for i in range(5)], seed=seed)
    return out


@pytest.mark.parametrize('seed', [1, 2])
def test_tree_changes_equal_the_reference(seed):
    before = listing(random_keys(seed), seed=seed) + edge_listing()
    after = mutated(before, seed)
    for old, new in ((before, after), (after, before), (before, before)):
        assert sorted_changes(tree_changes(build_tree(old), build_tree(new))) == \
            sorted_changes(reference.tree_changes(reference.build_tree(old),
                                                  reference.build_tree(new)))


class WeakHashlib:
    """blake2b cut to 10 bits, so that inodes collide often (the real odds are 1 in 10^7)."""

    @staticmethod
    def blake2b(data, digest_size):
        import hashlib
        digest = hashlib.blake2b(data, digest_size=digest_size).digest()

        class Digest:
            def digest(self):
                return bytes([digest[0], digest[1] & 3]) + bytes(digest_size - 2)
        return Digest()


def test_inode_collisions_are_resolved_as_the_reference_does(monkeypatch):
    monkeypatch.setattr(namespace, 'hashlib', WeakHashlib)
    monkeypatch.setattr(reference, 'hashlib', WeakHashlib)
    objects = listing(random_keys(5, count=250), seed=5)
    tree, _ref = assert_same_answers(objects)
    changed = mutated(objects, 5)
    assert sorted_changes(tree_changes(tree, build_tree(changed))) == sorted_changes(
        reference.tree_changes(reference.build_tree(objects), reference.build_tree(changed)))


def test_a_key_listed_twice_shows_its_later_entry():
    tree = build_tree([ObjectInfo('k', 1, 'e1', 0), ObjectInfo('k', 2, 'e2', 0)])
    node = tree.lookup(ROOT_INODE, b'k')
    assert (node.size, node.etag, tree.file_count, tree.total_bytes) == (2, 'e2', 1, 2)
    assert tree.get(node.inode).etag == 'e2'


def test_files_keep_no_node_object():
    tree = build_tree(listing([f'd{i % 3}/f{i}' for i in range(100)]))
    first = tree.lookup(tree.root.children[b'd0'].inode, b'f0')
    assert first is not tree.lookup(first.parent, b'f0')          # made on demand
    assert tree.root.children[b'd0'] is tree.root.children[b'd0']  # folders keep theirs


def test_nodes_made_on_demand_stay_bounded():
    tree = build_tree(listing([f'd{i % 3}/f{i}' for i in range(6000)]))
    for inode in list(tree.nodes):
        assert tree.get(inode).inode == inode
    assert len(tree._recent) <= namespace._RECENT_NODES


def tree_state(tree):
    """Everything a tree holds, as plain values (two trees with equal states answer alike)."""
    folders = [(t.node.inode, t.node.parent, t.node.key, t.node.name, t.node.mtime_ns,
                t.node.sorted_names, t.names, t.cols.tolist(), t.hex_etags, t.hex_upper, t.etags,
                t.etag_ends.tolist(), sorted((i, sub.node.inode) for i, sub in t.subdirs.items()),
                t.odd_keys) for t in tree.ordered]
    return (folders, sorted(tree.folders), tree.file_inodes.tolist(), tree.file_places.tolist(),
            tree.total_bytes, tree.file_count, tree.dir_count)


@pytest.mark.parametrize('seed', [0, 5, 6])
def test_tree_from_the_saved_columns_equals_the_tree_from_objects(seed):
    """A remount builds the tree from the saved listing's columns (sizes and mtimes as int64
    arrays, no ObjectInfo per file): the same tree as from the objects, which answer as the
    reference does (the tests above)."""
    objects = edge_listing() if seed == 0 else listing(random_keys(seed), seed=seed,
                                                        odd_etags=seed / 10)
    objects = [o for o in objects if o.key]     # a saved listing refuses an empty key
    random.Random(seed).shuffle(objects)
    data = saved_listing.encode_listing('s3://b/p', objects, 1_700_000_000)
    _, columns = saved_listing.decode_columns(data, 's3://b/p')
    assert type(columns.sizes).__name__ == type(columns.mtimes).__name__ == 'array'
    from_columns = build_tree_from_columns(columns.keys, columns.sizes, columns.etags,
                                           columns.mtimes, 123)
    # (a key whose surrogates spell valid UTF-8 comes back as that text: compare with the
    # objects of the same saved file)
    assert tree_state(from_columns) == tree_state(build_tree(columns.objects(), 123))
    assert tree_state(build_tree(objects, 123)) == tree_state(
        build_tree(saved_listing.Columns.of(objects).objects(), 123))


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(ValueError):
        build_tree_from_columns(['a', 'b'], [1, 2], ['e', 'e'], [0])
