"""Unit tests of pure logic: the block file format and the SSD tier's admission policy."""

import os
import tempfile
from pathlib import Path

import pytest

from cachefs.cache.disk import (CHUNK_SIZE, TEMP_TAG, CorruptBlock, DiskTier, parse_header,
                                read_block_file, scan, write_block_file)

BLOCK_ID = ('dir/shard-0.tfrecord', 'etag-1', 3)


@pytest.fixture
def block(tmp_path):
    data = os.urandom(CHUNK_SIZE * 3 + 1000)
    path = tmp_path / 'ab' / 'block.blk'
    write_block_file(str(path), BLOCK_ID, data)
    return path, data


def data_end(path):
    """Where the block's data ends in its file (O_DIRECT writes pad the file after it)."""
    header = parse_header(path.read_bytes()[:4096], BLOCK_ID)
    return header.data_offset + header.length


def test_round_trip_of_any_range(block):
    path, data = block
    for start, length in [(0, len(data)), (1, 10), (CHUNK_SIZE - 5, 10), (len(data) - 7, 7)]:
        header, got = read_block_file(str(path), BLOCK_ID, start, length)
        assert bytes(got) == data[start:start + length]


def test_flipped_bit_is_detected(block):
    path, data = block
    raw = bytearray(path.read_bytes())
    raw[data_end(path) - 1] ^= 1
    path.write_bytes(raw)
    with pytest.raises(CorruptBlock):
        read_block_file(str(path), BLOCK_ID, len(data) - 10, 10)
    # a range in an intact chunk is still served, verified
    assert bytes(read_block_file(str(path), BLOCK_ID, 0, 100)[1]) == data[:100]


def test_truncated_file_is_detected(block):
    path, data = block
    os.truncate(path, data_end(path) - 1)
    with pytest.raises(CorruptBlock):
        read_block_file(str(path), BLOCK_ID, 0, len(data))


def direct_io_works(folder):
    try:
        fd = os.open(Path(folder) / 'probe', os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize('root', ['/var/tmp', '/dev/shm'])
def test_written_direct_where_the_file_system_allows_else_buffered(root):
    """ext4 takes O_DIRECT (the file is zero-padded to 4 KiB after the data); tmpfs refuses it,
    and the block is written through the page cache instead. Both read back verified."""
    if not os.path.isdir(root):
        pytest.skip(f'no {root}')
    data = os.urandom(CHUNK_SIZE + 12345)
    with tempfile.TemporaryDirectory(dir=root) as folder:
        direct = direct_io_works(folder)
        path = Path(folder) / 'blocks' / 'ab' / 'block.blk'
        size = write_block_file(str(path), BLOCK_ID, data)
        end = data_end(path)
        assert size == path.stat().st_size
        assert size == ((end + 4095) // 4096 * 4096 if direct else end)
        assert path.read_bytes()[end:] == bytes(size - end)
        assert bytes(read_block_file(str(path), BLOCK_ID, 0, len(data))[1]) == data


@pytest.mark.parametrize('other', [('dir/other', 'etag-1', 3),
                                   ('dir/shard-0.tfrecord', 'etag-2', 3),
                                   ('dir/shard-0.tfrecord', 'etag-1', 4)])
def test_block_of_another_object_version_or_index_is_refused(block, other):
    path, _ = block
    with pytest.raises(CorruptBlock):
        read_block_file(str(path), other, 0, 10)


def test_files_are_private_and_interrupted_writes_are_cleaned_by_the_scan(block, tmp_path):
    """The start-up scan removes another process's leftovers, never a write of its own that is
    under way (the mount serves, and writes, while the scan runs)."""
    path, _ = block
    assert path.stat().st_mode & 0o777 == 0o600
    pid = 1 if os.getpid() != 1 else 2
    (path.parent / f'x.blk.tmp{pid}-456').write_bytes(b'half')
    ours = path.parent / f'y.blk{TEMP_TAG}789'
    ours.write_bytes(b'being written')
    found = scan(str(tmp_path))
    assert [name for name, _, _ in found] == ['ab/block.blk']
    assert list(path.parent.glob('*.tmp*')) == [ours]


def make_tier(tmp_path, eviction, capacity=10):
    tier = DiskTier(str(tmp_path), block_size=4, capacity=capacity, min_free_ratio=0,
                    eviction=eviction)
    tier.merge_scan([])
    return tier


def fill(tier, names):
    for name in names:
        assert tier.admission(4) is not None
        tier.written(name, 4, 4, free=10**9, total=10**9)


def test_none_policy_stops_admitting_when_full_and_evicts_nothing(tmp_path):
    tier = make_tier(tmp_path, 'none')
    fill(tier, ['a', 'b'])
    assert tier.admission(4) is None
    assert tier.used == 8 and tier.counters.evictions == 0


def test_lru_policy_evicts_the_least_recently_used(tmp_path):
    tier = make_tier(tmp_path, 'lru')
    fill(tier, ['a', 'b'])
    tier.touch('a')
    assert tier.admission(4) == ['b']
    assert tier.used <= 10


def test_concurrent_admissions_cannot_overshoot_the_capacity(tmp_path):
    tier = make_tier(tmp_path, 'none', capacity=8)
    assert tier.admission(4) == [] and tier.admission(4) == []
    assert tier.admission(4) is None       # reserved before either write finished


def test_shortage_of_free_space_evicts_and_pauses_admission(tmp_path):
    tier = DiskTier(str(tmp_path), 4, capacity=100, min_free_ratio=0.5, eviction='none')
    tier.merge_scan([])
    tier.admission(4)
    tier.written('a', 4, 4, free=10, total=100)       # 40 bytes short of half the disk
    assert tier.used == 0
    assert tier.admission(4) is None
