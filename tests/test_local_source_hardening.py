"""A local folder as a source: links never lead a read outside the folder, and a file rewritten
in place is a new version even when its mtime is put back.

Links that stay inside the folder are served (test_security covers link loops and dangling links).
"""

import errno
import os
import threading

import pytest

from cachefs.ufs.errors import ObjectChanged
from cachefs.ufs import local as local_module
from cachefs.ufs.local import LocalStore, _etag
from conftest import BLOCK_SIZE, Source, clean_env, run_cachefs

SECRET = b'root:$6$secret-hash:19000:0:99999:7:::\n'


def local(root):
    return Source('local', str(root), [], clean_env(), {}, root)


def make_source_with_links(tmp_path):
    """A source folder with links to a file and a folder outside it, and links inside it."""
    outside = tmp_path / 'outside'
    (outside / 'private').mkdir(parents=True)
    (outside / 'shadow').write_bytes(SECRET)
    (outside / 'private' / 'key.pem').write_bytes(SECRET)
    root = tmp_path / 'local-src'
    (root / 'data').mkdir(parents=True)
    (root / 'data' / 'file.bin').write_bytes(b'inside')
    os.symlink(outside / 'shadow', root / 'shadow-link')                 # absolute, to a file
    os.symlink('../../outside/private', root / 'data' / 'private-link')  # relative, to a folder
    os.symlink('data/file.bin', root / 'inside-file-link')
    os.symlink('data', root / 'inside-folder-link')
    return root, outside


@pytest.mark.fuse
def test_links_leading_outside_the_source_are_absent_and_links_inside_are_served(tmp_path,
                                                                                 mounter):
    root, _ = make_source_with_links(tmp_path)
    mounted = mounter.mount(local(root))
    found = {}
    for folder, _, names in os.walk(mounted.path):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, mounted.path)] = f.read()
    assert found == {'data/file.bin': b'inside', 'inside-file-link': b'inside',
                     'inside-folder-link/file.bin': b'inside'}
    assert not os.path.lexists(mounted.path / 'shadow-link')
    assert not os.path.lexists(mounted.path / 'data' / 'private-link')
    log_lines = [line for line in mounted.log_file.read_text().splitlines()
                 if 'lead outside the source folder' in line]
    # one line for the listing; data/private-link counts twice (also under inside-folder-link)
    assert len(log_lines) == 1 and 'skipped 3 link(s)' in log_lines[0], log_lines


@pytest.mark.fuse
def test_a_file_replaced_by_a_link_outside_after_listing_is_never_served(tmp_path, mounter):
    root, outside = make_source_with_links(tmp_path)
    (root / 'data' / 'victim.bin').write_bytes(b'x' * len(SECRET))     # same size as the secret
    (root / 'data' / 'sub').mkdir()
    (root / 'data' / 'sub' / 'key.pem').write_bytes(b'y' * len(SECRET))
    mounted = mounter.mount(local(root))
    assert os.path.getsize(mounted.path / 'data' / 'victim.bin') == len(SECRET)
    # after the listing: a file becomes a link to an outside file, a folder a link outside
    os.unlink(root / 'data' / 'victim.bin')
    os.symlink(outside / 'shadow', root / 'data' / 'victim.bin')
    (root / 'data' / 'sub' / 'key.pem').unlink()
    (root / 'data' / 'sub').rmdir()
    os.symlink(outside / 'private', root / 'data' / 'sub')
    for name in ('victim.bin', 'sub/key.pem'):
        with pytest.raises(OSError) as caught:
            (mounted.path / 'data' / name).read_bytes()
        assert caught.value.errno in (errno.EIO, errno.ENOENT), name
    assert (mounted.path / 'data' / 'file.bin').read_bytes() == b'inside'


@pytest.mark.parametrize('proc', ['with /proc', 'without /proc'])
def test_a_read_checks_the_opened_file_is_inside_even_when_its_version_matches(proc, tmp_path,
                                                                              monkeypatch):
    """The version check alone would let a swapped link through if the outside file had the same
    inode, size and times (another file system); the open file's real path is checked too."""
    if proc == 'without /proc':
        monkeypatch.setattr(local_module, '_PROC_FD', str(tmp_path / 'no-proc'))
    root, outside = make_source_with_links(tmp_path)
    store = LocalStore(str(root))
    keys = {info.key for info in store.list_objects()}
    assert 'shadow-link' not in keys and 'data/file.bin' in keys
    assert store.read('inside-file-link', store.stat('inside-file-link').etag, 0, 6) == b'inside'
    os.unlink(root / 'data' / 'file.bin')
    os.symlink(outside / 'shadow', root / 'data' / 'file.bin')
    with pytest.raises(ObjectChanged):
        store.stat('data/file.bin')
    # as if the listed version had been that of the outside file (same inode, size and times)
    with pytest.raises(ObjectChanged):
        store.read('data/file.bin', _etag(os.stat(outside / 'shadow')), 0, len(SECRET))


def rewrite_in_place_keeping_mtime(path, data):
    before = os.stat(path)
    with open(path, 'r+b') as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.fuse
def test_a_file_rewritten_in_place_with_its_mtime_restored_never_mixes_versions(tmp_path,
                                                                                mounter):
    root = tmp_path / 'local-src'
    root.mkdir()
    old, new = os.urandom(3 * BLOCK_SIZE), os.urandom(3 * BLOCK_SIZE)
    (root / 'three-blocks.bin').write_bytes(old)
    mounted = mounter.mount(local(root), '--prefetch-window', '0')
    path = mounted.path / 'three-blocks.bin'
    with open(path, 'rb', buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)   # no kernel read-ahead
        assert os.pread(f.fileno(), 4096, 0) == old[:4096]          # block 0 is now cached
    rewrite_in_place_keeping_mtime(root / 'three-blocks.bin', new)
    try:
        data = path.read_bytes()
    except OSError as exc:
        assert exc.errno == errno.EIO
    else:
        assert data == old, 'a read mixed two versions of the file'
    result = run_cachefs('refresh', mounted.path)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == new


def test_a_file_replaced_by_a_fifo_after_listing_fails_at_once(tmp_path):
    """Opening a FIFO blocks until a writer comes: a read must fail instead of hanging."""
    root = tmp_path / 'local-src'
    root.mkdir()
    (root / 'file.bin').write_bytes(b'data')
    store = LocalStore(str(root))
    [info] = store.list_objects()
    os.unlink(root / 'file.bin')
    os.mkfifo(root / 'file.bin')
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(
        pytest.raises(ObjectChanged, store.read, 'file.bin', info.etag, 0, 4)), daemon=True)
    reader.start()
    reader.join(10)
    assert outcome, 'the read hung on a FIFO'


def test_a_version_listed_by_an_older_cachefs_is_still_read_until_the_next_listing(tmp_path):
    """Listings saved before ctime was part of the version (inode-mtime-size) stay readable."""
    root = tmp_path / 'local-src'
    root.mkdir()
    (root / 'file.bin').write_bytes(b'data')
    st = os.stat(root / 'file.bin')
    legacy = f'{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}'
    store = LocalStore(str(root))
    assert store.read('file.bin', legacy, 0, 4) == b'data'
    [info] = store.list_objects()
    assert info.etag != legacy and store.read('file.bin', info.etag, 0, 4) == b'data'
