"""Unit tests of the FUSE handlers' error mapping (pure logic: no mount, no server)."""

import errno
import os

import pyfuse3
import pytest

from cachefs.fuse.operations import Operations
from cachefs.namespace import build_tree
from cachefs.ufs.base import ObjectInfo
from cachefs.ufs.errors import AccessDenied, ObjectNotFound, TransientError


class FailingCache:
    block_size = 1 << 20

    def __init__(self, error):
        self.error = error

    async def read(self, *args):
        raise self.error


def operations_failing_with(error):
    tree = build_tree([ObjectInfo('file.bin', 10, 'etag', 0)])
    return Operations(tree, FailingCache(error), entry_timeout=1, attr_timeout=1, uid=0, gid=0)


def file_inode(operations):
    return operations.tree.root.children[b'file.bin'].inode


@pytest.mark.parametrize('error, expected', [
    (RuntimeError('a bug'), errno.EIO),
    (KeyError('another bug'), errno.EIO),
    (TransientError('store kept failing'), errno.EIO),
    (ObjectNotFound('deleted'), errno.ENOENT),
    (AccessDenied('denied'), errno.EACCES),
])
async def test_read_errors_become_errno_and_never_escape(error, expected):
    operations = operations_failing_with(error)
    handle = await operations.open(file_inode(operations), os.O_RDONLY, None)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await operations.read(handle.fh, 0, 10)
    assert raised.value.errno == expected


async def test_unknown_inode_is_enoent():
    operations = operations_failing_with(RuntimeError())
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await operations.getattr(999_999)
    assert raised.value.errno == errno.ENOENT


async def test_opening_for_write_is_erofs():
    operations = operations_failing_with(RuntimeError())
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await operations.open(file_inode(operations), os.O_RDWR, None)
    assert raised.value.errno == errno.EROFS
