"""Nodes of a replaced tree are kept only while the kernel can still ask about them: while it holds
a reference (a lookup or a READDIRPLUS entry it has not forgotten) or a file handle is open on them.
A mount refreshed for months over changing objects that nobody looked up keeps none of them.

The counting is pure logic, checked against `Operations` with a stand-in cache; one real mount
checks it with the kernel's own lookups, forgets and releases.
"""

import errno
import os

import pyfuse3
import pytest
import trio

from cachefs.fuse.operations import Operations
from cachefs.namespace import ROOT_INODE, build_tree
from cachefs.ufs.base import ObjectInfo
from conftest import Source, clean_env, run_cachefs, wait_until


class FakeCache:
    block_size = 1 << 20

    async def read(self, key, etag, size, offset, length):
        return f'{key}@{etag}'.encode()[offset:offset + length]


def tree_of(version, names=('a.bin', 'b.bin', 'dir/c.bin')):
    return build_tree([ObjectInfo(name, 10, f'v{version}', 0) for name in names])


def operations(tree):
    return Operations(tree, FakeCache(), entry_timeout=1, attr_timeout=1, uid=0, gid=0)


def run(fn, *args):
    return trio.run(fn, *args)


def lookup(ops, name, parent=ROOT_INODE):
    return run(ops.lookup, parent, name, None).st_ino


def getattr_errno(ops, inode):
    try:
        run(ops.getattr, inode, None)
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def test_objects_replaced_by_many_refreshes_without_a_lookup_are_not_retained():
    ops = operations(tree_of(0))
    for version in range(1, 101):
        ops.replace_tree(tree_of(version))
    assert ops._retired == {}


def test_a_looked_up_node_is_retired_until_the_kernel_forgets_every_lookup():
    ops = operations(tree_of(0))
    inode = lookup(ops, b'a.bin')
    assert lookup(ops, b'a.bin') == inode
    ops.replace_tree(tree_of(1))
    assert set(ops._retired) == {inode}
    assert getattr_errno(ops, inode) == 0
    run(ops.forget, [(inode, 1)])
    assert getattr_errno(ops, inode) == 0             # one lookup is still held
    run(ops.forget, [(inode, 1)])
    assert ops._retired == {}
    assert getattr_errno(ops, inode) == errno.ENOENT


def test_an_open_handle_keeps_a_replaced_node_readable_until_release():
    ops = operations(tree_of(0))
    inode = lookup(ops, b'a.bin')
    fh = run(ops.open, inode, os.O_RDONLY, None).fh
    ops.replace_tree(tree_of(1))
    run(ops.forget, [(inode, 1)])
    assert getattr_errno(ops, inode) == 0
    assert run(ops.read, fh, 0, 100) == b'a.bin@v0'
    run(ops.release, fh)
    assert ops._retired == {}


def test_entries_sent_by_readdirplus_count_as_references(monkeypatch):
    monkeypatch.setattr(pyfuse3, 'readdir_reply', lambda token, name, attrs, next_id: True)
    ops = operations(tree_of(0))
    run(ops.readdir, ROOT_INODE, 0, None)
    listed = {node.inode for node in ops.tree.root.children.values()}
    ops.replace_tree(tree_of(1))
    replaced = {node.inode for node in tree_of(0).root.children.values() if not node.is_dir}
    assert set(ops._retired) == replaced and replaced < listed
    run(ops.forget, [(inode, 1) for inode in listed])
    assert ops._retired == {}


def test_a_retired_node_back_in_the_tree_is_served_by_the_tree():
    ops = operations(tree_of(0))
    inode = lookup(ops, b'a.bin')
    ops.replace_tree(tree_of(1))
    ops.replace_tree(tree_of(0))
    assert ops._retired == {} and getattr_errno(ops, inode) == 0


@pytest.mark.fuse
def test_refreshes_of_a_real_mount_keep_only_what_the_kernel_holds(tmp_path, mounter):
    root = tmp_path / 'local-src'
    root.mkdir()
    for index in range(20):
        (root / f'f{index}.bin').write_bytes(b'x')
    (root / 'held.bin').write_bytes(b'old')
    mounted = mounter.mount(Source('local', str(root), [], clean_env(), {}, root))
    held = open(mounted.path / 'held.bin', 'rb', buffering=0)
    try:
        assert held.read() == b'old'                  # now cached: the file will be replaced
        for cycle in range(1, 6):
            for index in range(20):                   # never looked up through the mount
                (root / f'f{index}.bin').write_bytes(b'x' * (cycle + 1))
            if cycle == 1:
                (root / 'held.bin').write_bytes(b'new!')
            result = run_cachefs('refresh', mounted.path)
            assert result.returncode == 0, result.stderr
            assert mounted.stats()['fuse_retired_nodes'] == 1    # the open file only
        assert os.fstat(held.fileno()).st_size == 3
        assert os.pread(held.fileno(), 3, 0) == b'old'
    finally:
        held.close()
    assert wait_until(lambda: mounted.stats()['fuse_retired_nodes'] == 0, timeout=10)
    assert (mounted.path / 'held.bin').read_bytes() == b'new!'
