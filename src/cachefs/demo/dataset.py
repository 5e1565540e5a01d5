"""Seeded synthetic data sets for the demo, the tests and the benchmarks.

Three shapes of data, all written into a local folder (to be uploaded with
``cachefs.demo.seaweed.upload_tree``) and all fully determined by ``seed``:

* ``make_tfrecord_shards``: large TFRecord shards of image-like samples, the
  sequential-read workload of a TF/PyTorch input pipeline;
* ``make_small_files``: an ImageNet-style tree of ~100 KiB files, the
  metadata- and open-heavy workload;
* ``make_edge_case_tree``: a small tree of awkward sizes and names for
  correctness tests (block boundaries, unicode, long names, big listings).

Speed matters (the benchmarks generate 1.5 GiB and more), so content is not
drawn byte by byte: each seed gets an 8 MiB pool of random bytes once, files
are built from slices of it at random offsets, and a per-file (or per-record)
header makes every file unique.  ``random.Random`` with a string seed is
stable across platforms and runs, so the same seed yields the same bytes.

Every generator returns ``[(relative posix path, size, sha256 hex)]`` sorted
by path, in the format of ``tree_manifest`` so that a mount can be compared
with its source.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import google_crc32c

from cachefs.demo import tfrecord

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

POOL_SIZE = 8 * MiB
_CHUNK = 1 * MiB              # write / hash granularity
_FILL_PIECE = 64 * KiB        # content is made of pool slices this long

Entry = tuple[str, int, str]  # (relative path, size, sha256 hex)


# --------------------------------------------------------------------------
# content


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> bytes:
    return random.Random("cachefs-pool:%s" % seed).randbytes(POOL_SIZE)


def _fill(rng: random.Random, pool: bytes, size: int) -> Iterator[bytes]:
    """Yield ``size`` bytes of pool slices taken at random offsets.

    Slices are short (64 KiB) so that any two blocks of a file differ: a cache
    that serves the wrong block of the right file gets caught.
    """
    left = size
    while left > 0:
        n = min(left, _FILL_PIECE)
        start = rng.randrange(0, len(pool) - n + 1)
        yield pool[start:start + n]
        left -= n


class _HashingWriter:
    """Buffered file writer that hashes what it writes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb", buffering=_CHUNK)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_whole(root: Path, rel: str, pieces: list) -> Entry:
    """Write a small file with one write call and hash it in one call."""
    data = b"".join(pieces)
    # Buffered: BufferedWriter retries short writes, a large write skips the buffer.
    with open(root / rel, "wb") as f:
        f.write(data)
    return rel, len(data), hashlib.sha256(data).hexdigest()


def _write_file(root: Path, rel: str, size: int, rng: random.Random, pool: bytes,
                tag: str) -> Entry:
    """Write one file of exactly ``size`` bytes: a unique header, then pool slices."""
    header = ("CACHEFS %s %s %d\n" % (tag, rel, size)).encode("utf-8")[:size]
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    if size <= _CHUNK:
        return _write_whole(root, rel, [header, *_fill(rng, pool, size - len(header))])
    with _HashingWriter(root / rel) as w:
        w.write(header)
        for piece in _fill(rng, pool, size - len(header)):
            w.write(piece)
    return rel, w.size, w.sha.hexdigest()


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _report(kind: str, entries: list[Entry], t0: float) -> None:
    total = sum(e[1] for e in entries)
    elapsed = time.monotonic() - t0
    log.info("generated %s: %d files, %.1f MiB in %.2f s (%.0f MiB/s)", kind, len(entries),
             total / MiB, elapsed, total / MiB / max(elapsed, 1e-9))


# --------------------------------------------------------------------------
# TFRecord shards

#: Sample payload header, little endian: magic b"CFS1", shard u32, index u32,
#: label u32, height u16, width u16, channels u8, 3 pad bytes.
_SAMPLE = struct.Struct("<4sIIIHHB3x")
SAMPLE_MAGIC = b"CFS1"
SAMPLE_HEADER_SIZE = _SAMPLE.size  # 24
CHANNELS = 3
NUM_CLASSES = 1000


def _image_sides(record_size_range: tuple[int, int]) -> tuple[int, int]:
    """Smallest and largest square side whose payload fits the size range."""
    lo, hi = record_size_range
    side_min = math.ceil(math.sqrt(max(0, lo - SAMPLE_HEADER_SIZE) / CHANNELS))
    side_max = math.floor(math.sqrt(max(0, hi - SAMPLE_HEADER_SIZE) / CHANNELS))
    if side_min < 1 or side_min > side_max or side_max > 0xFFFF:
        raise ValueError("record_size_range %r fits no %d-channel square image"
                         % (record_size_range, CHANNELS))
    return side_min, side_max


def make_tfrecord_shards(root, count: int = 24, shard_size: int = 64 * MiB,
                         record_size_range: tuple[int, int] = (90 * KiB, 130 * KiB),
                         seed: int = 0, prefix: str = "train",
                         threads: int | None = None) -> list[Entry]:
    """Write ``count`` TFRecord shards of about ``shard_size`` bytes each.

    Files are ``{prefix}-{i:05d}-of-{count:05d}.tfrecord`` directly in root.
    Each shard gets records until the next one would pass ``shard_size`` (at
    least one record per shard).

    Record payload layout (little endian), parsed by ``parse_sample``::

        offset  size  field
        0       4     magic b"CFS1"
        4       4     shard index   (uint32)
        8       4     record index within the shard (uint32)
        12      4     label         (uint32, 0..999)
        16      2     height        (uint16)
        18      2     width         (uint16, == height)
        20      1     channels      (uint8, 3)
        21      3     padding
        24      h*w*c pixels, uint8, HWC order

    Image sides vary so that payload sizes spread over ``record_size_range``
    (3x176x176+24 = 92,952 ... 3x210x210+24 = 132,324 bytes by default).
    ``threads`` (default: CPU count, at most 8) shards are written at once;
    the output does not depend on it.
    """
    t0 = time.monotonic()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sides = _image_sides(record_size_range)
    pool = _pool(seed)

    def one(shard: int) -> Entry:
        # Each shard has its own rng, so the bytes do not depend on threads.
        rng = random.Random("cachefs-tfrecord:%s:%s:%d" % (seed, prefix, shard))
        rel = "%s-%05d-of-%05d.tfrecord" % (prefix, shard, count)
        return _write_shard(root / rel, rel, shard, shard_size, sides, rng, pool)

    # File writes and sha256 release the GIL: threads scale with cores.
    with ThreadPoolExecutor(max_workers=threads or _default_threads()) as ex:
        entries = sorted(ex.map(one, range(count)))
    _report("%d tfrecord shards" % count, entries, t0)
    return entries


def _write_shard(path: Path, rel: str, shard: int, shard_size: int, sides: tuple[int, int],
                 rng: random.Random, pool: bytes) -> Entry:
    with _HashingWriter(path) as w:
        index = 0
        while True:
            side = rng.randint(*sides)
            npix = side * side * CHANNELS
            size = tfrecord.RECORD_OVERHEAD + SAMPLE_HEADER_SIZE + npix
            if index and w.size + size > shard_size:
                break
            _write_sample(w, rng, pool, shard, index, side, npix)
            index += 1
    return rel, w.size, w.sha.hexdigest()


def _write_sample(w: _HashingWriter, rng: random.Random, pool: bytes, shard: int, index: int,
                  side: int, npix: int) -> None:
    head = _SAMPLE.pack(SAMPLE_MAGIC, shard, index, rng.randrange(NUM_CLASSES),
                        side, side, CHANNELS)
    start = rng.randrange(0, len(pool) - npix + 1)
    pixels = pool[start:start + npix]
    # CRC the payload piecewise instead of concatenating ~100 KiB per record.
    crc = google_crc32c.extend(google_crc32c.value(head), pixels)
    w.write(tfrecord.record_header(SAMPLE_HEADER_SIZE + npix))
    w.write(head)
    w.write(pixels)
    w.write(tfrecord.record_footer(crc))


def parse_sample(payload) -> tuple[int, int, int, memoryview]:
    """Split a record payload into (label, height, width, pixels).

    ``pixels`` is a zero-copy memoryview of height*width*3 uint8 values in HWC
    order, e.g. ``torch.frombuffer(pixels, dtype=torch.uint8).view(h, w, 3)``.
    """
    info = parse_sample_header(payload)
    view = memoryview(payload)[SAMPLE_HEADER_SIZE:]
    return info[2], info[3], info[4], view


def parse_sample_header(payload) -> tuple[int, int, int, int, int, int]:
    """(shard, index, label, height, width, channels) of a record payload.

    Raises ValueError when the payload is not a sample of this generator.
    """
    if len(payload) < SAMPLE_HEADER_SIZE:
        raise ValueError("sample payload too short (%d bytes)" % len(payload))
    magic, shard, index, label, height, width, channels = _SAMPLE.unpack_from(payload)
    if magic != SAMPLE_MAGIC:
        raise ValueError("not a cachefs sample (magic %r)" % magic)
    if len(payload) != SAMPLE_HEADER_SIZE + height * width * channels:
        raise ValueError("sample payload is %d bytes, header says %dx%dx%d"
                         % (len(payload), height, width, channels))
    return shard, index, label, height, width, channels


# --------------------------------------------------------------------------
# ImageNet-style small files


def make_small_files(root, count: int = 20000, folders: int = 100,
                     size_range: tuple[int, int] = (90 * KiB, 130 * KiB),
                     seed: int = 0, threads: int | None = None) -> list[Entry]:
    """Write ``count`` files spread evenly over ``folders`` synset folders.

    Layout: ``n01234567/n01234567_10000.JPEG`` (synset ids drawn from the
    seed).  Contents start with a JPEG SOI/APP0 marker and a unique header and
    end with an EOI marker; sizes are uniform in ``size_range`` (inclusive).
    Folders are written ``threads`` at a time; the output does not depend on it.
    """
    t0 = time.monotonic()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lo, hi = size_range
    if lo < 16 or lo > hi:
        raise ValueError("size_range %r must be 16 <= lo <= hi" % (size_range,))
    rng = random.Random("cachefs-small:%s" % seed)
    synsets = ["n%08d" % v for v in sorted(rng.sample(range(1_000_000, 16_000_000), folders))]
    pool = _pool(seed)
    per_folder, extra = divmod(count, folders)

    def one(k: int) -> list[Entry]:
        synset = synsets[k]
        frng = random.Random("cachefs-small:%s:%s" % (seed, synset))
        (root / synset).mkdir(exist_ok=True)
        first_id = frng.randrange(1, 50_000)
        return [_write_jpeg_like(root, "%s/%s_%d.JPEG" % (synset, synset, first_id + j),
                                 frng.randint(lo, hi), frng, pool, seed)
                for j in range(per_folder + (1 if k < extra else 0))]

    with ThreadPoolExecutor(max_workers=threads or _default_threads()) as ex:
        entries = sorted(e for folder in ex.map(one, range(folders)) for e in folder)
    _report("%d small files" % count, entries, t0)
    return entries


def _write_jpeg_like(root: Path, rel: str, size: int, rng: random.Random, pool: bytes,
                     seed: int) -> Entry:
    header = b"\xff\xd8\xff\xe0" + ("CACHEFS small %s %s %d\n" % (seed, rel, size)).encode()
    return _write_whole(root, rel, [header, *_fill(rng, pool, size - len(header) - 2), b"\xff\xd9"])


# --------------------------------------------------------------------------
# edge cases


def edge_case_layout(block_size: int = 4 * MiB) -> list[tuple[str, int]]:
    """(relative path, size) of every file ``make_edge_case_tree`` writes."""
    long_name = "L" * (255 - len(".bin")) + ".bin"  # 255 bytes, the usual NAME_MAX
    layout = [
        ("empty.bin", 0),
        ("one_byte.bin", 1),
        ("block_minus_one.bin", block_size - 1),
        ("one_block.bin", block_size),
        ("one_block_plus_one.bin", block_size + 1),
        ("five_and_a_half_blocks.bin", 5 * block_size + block_size // 2),
        ("a/b/c/d/e/f/g/file.bin", 4321),
        ("données/日本語 ファイル.txt", 1000),
        ("emoji 🚀.bin", 2048),
        ("with spaces/name with spaces.txt", 333),
        ("special/plus+sign.txt", 100),
        ("special/percent%20literal%.txt", 101),
        ("special/hash#tag.txt", 102),
        ("special/punct &=,;~'()!@$.txt", 103),
        ("long/" + long_name, 255),
    ]
    # 300 entries cross the 100-entry listing pages of OSS (and S3's 1000
    # when a test asks for small pages).
    layout += [("many/f%04d.dat" % i, 64 + (i * 37) % 4000) for i in range(300)]
    return layout


def make_edge_case_tree(root, seed: int = 0, block_size: int = 4 * MiB) -> list[Entry]:
    """Write the files of ``edge_case_layout(block_size)`` under ``root``.

    Sizes sit on and around block boundaries (0, 1, block-1, block, block+1,
    5.5 blocks); names cover deep paths, unicode, spaces, ``+ % # & = , ; ~ '
    ( ) ! @ $``, a 255-byte name, and a 300-file folder.
    """
    t0 = time.monotonic()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pool = _pool(seed)
    entries = []
    for rel, size in edge_case_layout(block_size):
        rng = random.Random("cachefs-edge:%s:%s" % (seed, rel))
        entries.append(_write_file(root, rel, size, rng, pool, "edge %s" % seed))
    entries.sort()
    _report("edge case tree", entries, t0)
    return entries


# --------------------------------------------------------------------------
# manifests


def file_sha256(path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks into one reused buffer."""
    sha = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sha.update(view[:n])
    return sha.hexdigest()


def tree_manifest(root, threads: int = 4) -> dict[str, tuple[int, str]]:
    """{relative posix path: (size, sha256 hex)} of every regular file under root.

    Symlinks are not followed.  Files are hashed ``threads`` at a time (hashlib
    and file reads release the GIL), which helps most on a FUSE mount.
    """
    root = Path(root)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                paths.append(full)

    def one(full):
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        return rel, (os.path.getsize(full), file_sha256(full))

    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return dict(pool.map(one, paths))
    return dict(map(one, paths))


def entries_to_manifest(entries: list[Entry]) -> dict[str, tuple[int, str]]:
    """Turn a generator's return value into the ``tree_manifest`` format."""
    return {rel: (size, sha) for rel, size, sha in entries}
