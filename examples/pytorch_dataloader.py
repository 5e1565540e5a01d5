"""Read TFRecord shards from a cachefs mount the way a PyTorch training input pipeline does.

    python examples/pytorch_dataloader.py /mnt/imagenet --workers 8 --epochs 2
    python examples/pytorch_dataloader.py /mnt/imagenet --no-torch     # without PyTorch

The shards are the files `*.tfrecord` under the folder (`cachefs demo` and
`cachefs.demo.dataset.make_tfrecord_shards` write such shards; each record is one image
sample). Every epoch shuffles the shard order and, within a buffer, the records; the DataLoader's
worker processes each read a share of the shards sequentially, which is the access pattern
cachefs prefetches for. Records are CRC-checked and parsed with `cachefs.demo.tfrecord` and
`cachefs.demo.dataset`, so neither TensorFlow nor a TFRecord package is needed.

`--no-torch` reads the same shards with threads instead of DataLoader workers, for machines
without PyTorch. Both print, per epoch, the records read, the rate, and a checksum of the labels
(independent of the order), which must be the same for every epoch and both modes.
"""

import argparse
import hashlib
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cachefs.demo.dataset import parse_sample
from cachefs.demo.tfrecord import RECORD_OVERHEAD, iter_records

MiB = 1 << 20


def list_shards(root):
    """The TFRecord shards under `root`, sorted by path."""
    shards = sorted(str(path) for path in Path(root).rglob('*.tfrecord'))
    if not shards:
        raise SystemExit(f'no *.tfrecord files under {root}')
    return shards


def epoch_order(shards, seed, epoch):
    """The shard order of one epoch: shuffled, the same in every worker that asks."""
    order = list(shards)
    random.Random(f'{seed}:{epoch}').shuffle(order)
    return order


def read_shard(path):
    """Yield (label, height, width, pixels, record bytes) for each record of one shard."""
    with open(path, 'rb', buffering=1 << 20) as f:
        for payload in iter_records(f, verify=True):
            label, height, width, pixels = parse_sample(payload)
            yield label, height, width, pixels, len(payload) + RECORD_OVERHEAD


def label_checksum(labels):
    """sha256 of the sorted labels: equal for the same records read in any order."""
    return hashlib.sha256(','.join(map(str, sorted(labels))).encode()).hexdigest()


def report(epoch, records, nbytes, labels, seconds, as_json):
    summary = {'epoch': epoch, 'records': records, 'bytes': nbytes,
               'label_checksum': label_checksum(labels), 'seconds': round(seconds, 3)}
    if as_json:
        print(json.dumps(summary), flush=True)
    else:
        print(f'epoch {epoch}: {records} records, {nbytes / MiB:.1f} MiB in {seconds:.2f}s = '
              f'{nbytes / MiB / max(seconds, 1e-9):.0f} MiB/s, '
              f'{records / max(seconds, 1e-9):.0f} samples/s, '
              f'labels {summary["label_checksum"][:12]}', flush=True)
    return summary


# -- without PyTorch: the reading code alone, with threads as the workers --

def run_plain(shards, args):
    def read_all(path):
        labels, nbytes = [], 0
        for label, _height, _width, _pixels, size in read_shard(path):
            labels.append(label)
            nbytes += size
        return labels, nbytes

    summaries = []
    for epoch in range(1, args.epochs + 1):
        start = time.monotonic()
        labels, nbytes = [], 0
        with ThreadPoolExecutor(args.workers) as pool:
            order = epoch_order(shards, args.seed, epoch)
            for shard_labels, shard_bytes in pool.map(read_all, order):
                labels += shard_labels
                nbytes += shard_bytes
        summaries.append(report(epoch, len(labels), nbytes, labels, time.monotonic() - start,
                                args.json))
    return summaries


# -- with PyTorch --

try:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info
except ImportError:          # --no-torch still works
    torch = None
    IterableDataset = object


class TFRecordShards(IterableDataset):
    """Samples of TFRecord shards: each worker reads its share of the epoch's shard order and
    yields (image, label, record bytes), shuffled within a buffer."""

    def __init__(self, shards, crop, shuffle_buffer, seed):
        self.shards, self.crop = shards, crop
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        # the DataLoader starts its workers anew every epoch, each with a copy of this object
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = epoch_order(self.shards, self.seed, self.epoch)[worker::workers]
        rng = random.Random(f'{self.seed}:{self.epoch}:{worker}')
        buffer = []
        for path in mine:
            for label, height, width, pixels, size in read_shard(path):
                buffer.append((self.to_tensor(pixels, height, width), label, size))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def to_tensor(self, pixels, height, width):
        """A (3, crop, crop) uint8 tensor: the centre of the image, zero-padded if smaller."""
        image = torch.frombuffer(bytearray(pixels), dtype=torch.uint8)
        image = image.view(height, width, 3).permute(2, 0, 1)
        pad_h, pad_w = max(0, self.crop - height), max(0, self.crop - width)
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (pad_w // 2, pad_w - pad_w // 2,
                                                    pad_h // 2, pad_h - pad_h // 2))
        top = (image.shape[1] - self.crop) // 2
        left = (image.shape[2] - self.crop) // 2
        return image[:, top:top + self.crop, left:left + self.crop].contiguous()


def run_torch(shards, args):
    dataset = TFRecordShards(shards, args.crop, args.shuffle_buffer, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=torch.cuda.is_available())
    summaries = []
    for epoch in range(1, args.epochs + 1):
        dataset.set_epoch(epoch)
        start = time.monotonic()
        labels, nbytes = [], 0
        for images, batch_labels, sizes in loader:
            # a training step goes here: model(images.cuda().float() / 255), loss, backward
            assert images.shape[1:] == (3, args.crop, args.crop)
            labels += batch_labels.tolist()
            nbytes += int(sizes.sum())
        summaries.append(report(epoch, len(labels), nbytes, labels, time.monotonic() - start,
                                args.json))
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('root', help='folder with the *.tfrecord shards (a cachefs mount)')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--workers', type=int, default=4, help='DataLoader workers (threads '
                        'with --no-torch)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--crop', type=int, default=160, help='side of the square crop')
    parser.add_argument('--shuffle-buffer', type=int, default=256,
                        help='records each worker shuffles among')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-torch', action='store_true',
                        help='read with plain Python threads, without PyTorch')
    parser.add_argument('--json', action='store_true', help='one JSON line per epoch')
    args = parser.parse_args(argv)
    if not args.no_torch and torch is None:
        parser.error('PyTorch is not installed: pip install torch, or run with --no-torch')
    shards = list_shards(args.root)
    (run_plain if args.no_torch else run_torch)(shards, args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
