"""The examples in examples/ read a real cachefs mount and see exactly the records of the source.

The PyTorch example runs with DataLoader workers where `import torch` works; elsewhere (CI has no
PyTorch: it is a 700 MB install) its plain-Python reader runs instead (`--no-torch`), which is the
same shard listing, shuffling and record parsing without the DataLoader. tf_data.py needs
TensorFlow and is only checked to compile.
"""

import hashlib
import importlib.util
import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.demo.dataset import MiB, make_tfrecord_shards, parse_sample_header, tree_manifest
from cachefs.demo.tfrecord import read_records
from conftest import Source, clean_env

EXAMPLES = Path(__file__).parent.parent / 'examples'
HAVE_TORCH = importlib.util.find_spec('torch') is not None


@pytest.fixture(scope='module')
def tfrecord_source(tmp_path_factory):
    root = tmp_path_factory.mktemp('tfrecord-shards')
    make_tfrecord_shards(root, count=2, shard_size=4 * MiB)
    return Source('local', str(root), [], clean_env(), tree_manifest(root), root)


def expected_records(root):
    """(record count, label checksum) read straight from the source files."""
    labels = [parse_sample_header(payload)[2]
              for path in sorted(Path(root).glob('*.tfrecord')) for payload in read_records(path)]
    return len(labels), hashlib.sha256(','.join(map(str, sorted(labels))).encode()).hexdigest()


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.fuse
def test_pytorch_example_reads_every_record_of_the_mount_in_each_epoch(tfrecord_source, mounter):
    mounted = mounter.mount(tfrecord_source)
    mode = [] if HAVE_TORCH else ['--no-torch']
    epochs = run_example('pytorch_dataloader.py', mounted.path, '--epochs', 2, '--workers', 2,
                         '--batch-size', 16, '--json', *mode)
    count, checksum = expected_records(tfrecord_source.local_root)
    assert count > 2
    assert [(e['epoch'], e['records'], e['label_checksum']) for e in epochs] == [
        (1, count, checksum), (2, count, checksum)]
    assert epochs[0]['bytes'] == sum(size for size, _ in tfrecord_source.manifest.values())


def test_pytorch_example_without_torch_asks_for_no_torch(tmp_path):
    if HAVE_TORCH:
        pytest.skip('PyTorch is installed here')
    result = subprocess.run([sys.executable, str(EXAMPLES / 'pytorch_dataloader.py'), tmp_path],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 2
    assert '--no-torch' in result.stderr


def test_tf_data_example_compiles(tmp_path):
    py_compile.compile(str(EXAMPLES / 'tf_data.py'), cfile=str(tmp_path / 'tf_data.pyc'),
                       doraise=True)
