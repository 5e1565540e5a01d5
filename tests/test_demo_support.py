"""Tests for the demo support modules: TFRecord framing, data generators and
the loopback SeaweedFS launcher."""

import hashlib
import io
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cachefs.demo import dataset, seaweed, tfrecord  # noqa: E402

KiB = 1024


# ---------------------------------------------------------------- tfrecord


class _Trickle(io.RawIOBase):
    """A raw stream that returns at most 7 bytes per call, like a slow pipe."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self._buf.read(min(len(b), 7))
        b[:len(chunk)] = chunk
        return len(chunk)


def _records(n=50, seed=1):
    rng = random.Random(seed)
    return [b""] + [rng.randbytes(rng.randint(1, 5000)) for _ in range(n)]


def test_masked_crc32c_reference_values():
    import google_crc32c

    # CRC-32C check value from RFC 3720 / the Castagnoli paper.
    assert google_crc32c.value(b"123456789") == 0xE3069283
    assert tfrecord.masked_crc32c(b"") == 0xA282EAD8
    crc = 0xE3069283
    assert tfrecord.masked_crc32c(b"123456789") == \
        (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_tfrecord_round_trip():
    recs = _records()
    buf = io.BytesIO()
    written = tfrecord.write_records(buf, recs)
    assert written == len(buf.getvalue()) == \
        sum(map(len, recs)) + len(recs) * tfrecord.RECORD_OVERHEAD
    assert list(tfrecord.iter_records(io.BytesIO(buf.getvalue()))) == recs
    # Short reads from raw streams must be handled.
    assert list(tfrecord.iter_records(_Trickle(buf.getvalue()))) == recs
    assert list(tfrecord.iter_records(io.BytesIO(b""))) == []


def test_tfrecord_file_round_trip(tmp_path):
    recs = _records(20, seed=2)
    path = tmp_path / "x.tfrecord"
    with open(path, "wb") as f:
        tfrecord.write_records(f, recs)
    assert tfrecord.read_records(path) == recs
    with open(path, "rb", buffering=0) as f:
        assert list(tfrecord.iter_records(f)) == recs


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_tfrecord_corruption_detected(where):
    recs = _records(5, seed=3)
    raw = bytearray()
    buf = io.BytesIO()
    tfrecord.write_records(buf, recs)
    raw[:] = buf.getvalue()
    # Second record starts after the first (the empty one).
    start = tfrecord.RECORD_OVERHEAD
    n = len(recs[1])
    offset = {"length": start + 1, "length_crc": start + 9,
              "data": start + 12 + n // 2, "data_crc": start + 12 + n + 1}[where]
    raw[offset] ^= 0x40
    with pytest.raises(tfrecord.CorruptRecord):
        list(tfrecord.iter_records(io.BytesIO(bytes(raw))))
    assert issubclass(tfrecord.CorruptRecord, ValueError)
    if where == "data":
        # Without verification the flipped payload comes through unchanged.
        got = list(tfrecord.iter_records(io.BytesIO(bytes(raw)), verify=False))
        assert got[1] != recs[1] and len(got) == len(recs)


@pytest.mark.parametrize("cut", [1, 5, 12, 100, 4])
def test_tfrecord_truncation_detected(cut):
    buf = io.BytesIO()
    tfrecord.write_records(buf, _records(3, seed=4))
    data = buf.getvalue()[:-cut]
    with pytest.raises(tfrecord.CorruptRecord):
        list(tfrecord.iter_records(io.BytesIO(data)))


# ---------------------------------------------------------------- dataset


def test_tfrecord_shards_parse(tmp_path):
    lo, hi = 90 * KiB, 130 * KiB
    entries = dataset.make_tfrecord_shards(tmp_path, count=3, shard_size=2 * 1024 * KiB,
                                           record_size_range=(lo, hi), seed=7, prefix="val")
    assert [e[0] for e in entries] == ["val-%05d-of-00003.tfrecord" % i for i in range(3)]
    for shard, (rel, size, sha) in enumerate(entries):
        assert 2 * 1024 * KiB - hi - tfrecord.RECORD_OVERHEAD < size <= 2 * 1024 * KiB
        assert dataset.file_sha256(tmp_path / rel) == sha
        records = tfrecord.read_records(tmp_path / rel)
        for index, payload in enumerate(records):
            assert lo <= len(payload) <= hi
            label, h, w, pixels = dataset.parse_sample(payload)
            assert h == w and 0 <= label < dataset.NUM_CLASSES
            assert len(pixels) == h * w * dataset.CHANNELS
            assert dataset.parse_sample_header(payload)[:2] == (shard, index)
    with pytest.raises(ValueError):
        dataset.parse_sample(b"x" * 100)


def test_dataset_determinism(tmp_path):
    def shas(seed, name):
        a = dataset.make_small_files(tmp_path / name / "small", count=40, folders=4,
                                     size_range=(1 * KiB, 8 * KiB), seed=seed)
        b = dataset.make_tfrecord_shards(tmp_path / name / "tf", count=2, shard_size=600 * KiB,
                                         seed=seed)
        return a, b

    first, second, other = shas(0, "a"), shas(0, "b"), shas(1, "c")
    assert first == second
    for mine, theirs in zip(first, other):
        assert {e[2] for e in mine}.isdisjoint({e[2] for e in theirs})
    small = first[0]
    assert len(small) == 40 and len({e[2] for e in small}) == 40
    assert all(e[0].endswith(".JPEG") and e[0].split("/")[0] == e[0].split("/")[1].split("_")[0]
               for e in small)
    # Thread count must not change the bytes.
    again = dataset.make_small_files(tmp_path / "d", count=40, folders=4,
                                     size_range=(1 * KiB, 8 * KiB), seed=0, threads=1)
    assert again == small


def test_edge_case_tree_manifest(tmp_path):
    block = 64 * KiB
    entries = dataset.make_edge_case_tree(tmp_path, seed=5, block_size=block)
    manifest = dataset.tree_manifest(tmp_path)
    assert manifest == dataset.entries_to_manifest(entries)
    assert dataset.tree_manifest(tmp_path, threads=1) == manifest
    sizes = {rel: size for rel, (size, _) in manifest.items()}
    assert sizes["empty.bin"] == 0
    assert sizes["one_block.bin"] == block
    assert sizes["one_block_plus_one.bin"] == block + 1
    assert sizes["five_and_a_half_blocks.bin"] == 5 * block + block // 2
    assert "a/b/c/d/e/f/g/file.bin" in sizes
    assert "données/日本語 ファイル.txt" in sizes and "emoji 🚀.bin" in sizes
    assert any(len(rel.split("/")[-1].encode()) == 255 for rel in sizes)
    assert sum(rel.startswith("many/") for rel in sizes) == 300
    for ch in " +%#":
        assert any(ch in rel for rel in sizes)
    # Distinct blocks of one file differ, so a cache serving the wrong block is caught.
    data = (tmp_path / "five_and_a_half_blocks.bin").read_bytes()
    blocks = [data[i:i + block] for i in range(0, len(data), block)]
    assert len(set(blocks)) == len(blocks)
    assert manifest["empty.bin"][1] == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- seaweed


def test_pick_ports():
    ports = seaweed.pick_ports(4)
    assert len(set(ports)) == 4
    for p in ports:
        assert 1024 < p < 65536 - seaweed.GRPC_PORT_OFFSET
        assert p + seaweed.GRPC_PORT_OFFSET not in ports


def _pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _list(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": 100})
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def test_seaweed_upload_round_trip(tmp_path):
    try:
        seaweed.find_weed()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    src = tmp_path / "src"
    entries = dataset.make_edge_case_tree(src, seed=11, block_size=256 * KiB)
    manifest = dataset.tree_manifest(src)

    srv = seaweed.SeaweedServer(tmp_path / "s3")
    with srv:
        pid = srv.pid
        assert srv.endpoint == "http://127.0.0.1:%d" % srv.s3_port
        assert srv.env()["AWS_ENDPOINT_URL"] == srv.endpoint
        srv.create_bucket("cachefs-test")
        srv.create_bucket("cachefs-test")  # idempotent
        client = srv.client()
        uploaded = seaweed.upload_tree(client, "cachefs-test", "/data/", src, threads=8)
        assert len(uploaded) == len(entries)

        listed = _list(client, "cachefs-test", "data/")
        assert {k[len("data/"):]: o["Size"] for k, o in listed.items()} == \
            {rel: size for rel, (size, _) in manifest.items()}
        for key, obj in listed.items():
            body = client.get_object(Bucket="cachefs-test", Key=key)["Body"].read()
            rel = key[len("data/"):]
            assert hashlib.sha256(body).hexdigest() == manifest[rel][1], rel
            # Single-PUT uploads: the ETag is the plain MD5.
            assert obj["ETag"].strip('"') == hashlib.md5(body).hexdigest(), rel
        # Kill quickly: acknowledged writes survive a SIGKILL (checked below).
        srv.stop(timeout=2)
    assert not srv.running and _pid_gone(pid)
    srv.stop()  # idempotent

    # Restart on the same data dir: everything is still there.
    with seaweed.SeaweedServer(tmp_path / "s3", secret_key="other-secret") as srv2:
        assert srv2.pid != pid
        listed = _list(srv2.client(), "cachefs-test", "data/")
        assert len(listed) == len(entries)
        body = srv2.client().get_object(Bucket="cachefs-test",
                                        Key="data/five_and_a_half_blocks.bin")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == manifest["five_and_a_half_blocks.bin"][1]
        pid2 = srv2.pid
        srv2.stop(timeout=2)
    assert _pid_gone(pid2)
