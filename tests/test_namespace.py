"""Unit tests of pure logic: how store keys become a POSIX tree (no FUSE, no server)."""

import os
import random

from cachefs.namespace import ROOT_INODE, build_tree, tree_changes
from cachefs.ufs.base import ObjectInfo


def tree_of(*keys):
    return build_tree([ObjectInfo(key, 1, 'etag', 0) for key in keys])


def paths(tree):
    found = set()

    def walk(node, prefix):
        for name, child in node.children.items():
            path = prefix + os.fsdecode(name)
            found.add(path + ('/' if child.is_dir else ''))
            if child.is_dir:
                walk(child, path + '/')
    walk(tree.root, '')
    return found


def test_implicit_folders_come_from_key_prefixes():
    assert paths(tree_of('a/b/c.bin', 'd.bin')) == {'a/', 'a/b/', 'a/b/c.bin', 'd.bin'}


def test_directory_markers_make_empty_folders():
    assert paths(tree_of('empty/', 'a/b/')) == {'empty/', 'a/', 'a/b/'}


def test_keys_with_dot_segments_or_empty_segments_are_skipped():
    tree = tree_of('ok.bin', './x', '../escape', 'a/../b', 'a//b', '/abs', 'a/.', 'trail//')
    assert paths(tree) == {'ok.bin'}


def test_key_with_nul_is_skipped():
    assert paths(tree_of('bad\0name', 'ok')) == {'ok'}


def test_names_over_255_bytes_are_skipped_but_255_is_kept():
    kept, too_long = 'k' * 255, 'x' * 256
    assert paths(tree_of(kept, too_long, 'dir/' + too_long + '/f')) == {kept}


def test_multibyte_name_length_is_counted_in_bytes():
    assert paths(tree_of('é' * 128)) == set()   # 256 bytes in UTF-8
    assert paths(tree_of('é' * 127)) == {'é' * 127}


def test_key_that_is_both_file_and_prefix_shows_the_folder():
    for keys in (('a', 'a/b'), ('a/b', 'a')):
        tree = tree_of(*keys)
        assert paths(tree) == {'a/', 'a/b'}
        assert tree.file_count == 1


def test_control_characters_and_non_utf8_names_are_kept_as_bytes():
    weird = 'tab\there\x01' + os.fsdecode(b'\xff\xfe')
    tree = tree_of(weird)
    assert tree.lookup(ROOT_INODE, os.fsencode(weird)) is not None


def test_inodes_are_stable_and_independent_of_listing_order():
    keys = [f'd{i % 7}/f{i}' for i in range(500)]
    first = build_tree([ObjectInfo(k, 1, 'e', 0) for k in keys])
    random.Random(1).shuffle(keys)
    second = build_tree([ObjectInfo(k, 1, 'e', 0) for k in keys])
    assert {n.key: i for i, n in first.nodes.items()} == {n.key: i for i, n in second.nodes.items()}
    assert len(first.nodes) == 1 + 7 + 500


def test_counts_and_total_size():
    tree = build_tree([ObjectInfo('a/x', 10, 'e', 0), ObjectInfo('a/y', 5, 'e', 0),
                       ObjectInfo('b/', 0, '', 0)])
    assert (tree.file_count, tree.dir_count, tree.total_bytes) == (2, 3, 15)


def test_readdir_order_is_sorted_by_name_bytes():
    tree = tree_of('b', 'a', 'C', 'ä')
    assert tree.root.sorted_names == sorted([b'b', b'a', b'C', 'ä'.encode()])


def test_tree_changes_name_replaced_and_deleted_objects():
    old = build_tree([ObjectInfo('keep', 1, 'e1', 0), ObjectInfo('replace', 1, 'e1', 0),
                      ObjectInfo('dir/gone', 1, 'e1', 0)])
    new = build_tree([ObjectInfo('keep', 1, 'e1', 0), ObjectInfo('replace', 1, 'e2', 0),
                      ObjectInfo('dir/added', 1, 'e1', 0)])
    changed, removed = tree_changes(old, new)
    by_key = {n.key: i for i, n in old.nodes.items()}
    assert changed == [by_key['dir/']]
    assert sorted(removed) == sorted([(by_key['dir/'], b'gone'), (ROOT_INODE, b'replace'),
                                      (by_key['dir/'], b'added')])


def test_a_replaced_object_gets_a_new_inode_and_an_unchanged_one_keeps_its_own():
    old = build_tree([ObjectInfo('a', 1, 'e1', 0), ObjectInfo('b', 1, 'e1', 0)])
    new = build_tree([ObjectInfo('a', 1, 'e2', 0), ObjectInfo('b', 1, 'e1', 0)])
    assert old.lookup(ROOT_INODE, b'a').inode != new.lookup(ROOT_INODE, b'a').inode
    assert old.lookup(ROOT_INODE, b'b').inode == new.lookup(ROOT_INODE, b'b').inode
