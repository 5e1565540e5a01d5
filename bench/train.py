"""The training benchmark: a real ResNet-50 loop fed from TFRecord shards on a cachefs mount,
next to the same loop fed by synthetic tensors, in the same run.

    python bench/train.py --data /mnt/imagenet-tfrecords            # shards already mounted
    python bench/train.py --self-contained --quick                  # SeaweedFS + cachefs here

The records hold raw uint8 images (`cachefs.demo.dataset.make_tfrecord_shards`), so that image
decoding does not hide the I/O path: DataLoader workers parse the shards on the mount (CRCs
checked), crop each image to a fixed size, and the model sees the same tensor shapes as in the
synthetic loop. Shard order is shuffled every epoch and records within a shuffle buffer. On a GPU
the loop uses bf16 autocast and channels_last; both loops upsample to --train-size on the device,
so they do exactly the same compute. It prints images/s per epoch for the mount and for
synthetic data, and their ratio (the target is >= 0.99 from the second epoch on).

torch is not a dependency of cachefs: this script needs it (torchvision is optional: without it
a ResNet-50 defined here is used).
"""

import argparse
import glob
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cachefs.demo.dataset import parse_sample
from cachefs.demo.tfrecord import iter_records

log = logging.getLogger(__name__)

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info
except ImportError:      # pragma: no cover - reported by main()
    torch = None
    IterableDataset = object


# -- the model: torchvision's ResNet-50 when installed, else the same architecture here --

class Bottleneck(nn.Module if torch else object):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


def resnet50(num_classes=1000):
    try:
        import torchvision
        return torchvision.models.resnet50(num_classes=num_classes)
    except ImportError:
        pass
    layers, inplanes = [], 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
        layers.append(Bottleneck(inplanes, planes, stride, downsample))
        inplanes = planes * 4
        layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2048, num_classes))


# -- the input pipeline --

class ShardDataset(IterableDataset):
    """Samples of TFRecord shards: each worker takes its share of the shards, in an order
    shuffled per epoch, and shuffles records within a buffer."""

    def __init__(self, shards, crop, epoch_seed, shuffle_buffer=512):
        self.shards = list(shards)
        self.crop = crop
        self.epoch_seed = epoch_seed
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.epoch_seed * 1000 + worker)
        order = self.shards[:]
        random.Random(self.epoch_seed).shuffle(order)
        buffer = []
        for shard in order[worker::workers]:
            with open(shard, 'rb', buffering=1 << 20) as f:
                for payload in iter_records(f, verify=True):
                    buffer.append(self._sample(payload, rng))
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _sample(self, payload, rng):
        label, height, width, pixels = parse_sample(payload)
        image = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(height, width, 3)
        top = rng.randrange(height - self.crop + 1)
        left = rng.randrange(width - self.crop + 1)
        crop = image[top:top + self.crop, left:left + self.crop]
        return crop.permute(2, 0, 1).contiguous(), label


# -- the loops --

def make_step(model, optimizer, device, train_size):
    use_bf16 = device.type == 'cuda'

    def step(images, labels):
        images = images.to(device, non_blocking=True).float().div_(255)
        images = F.interpolate(images, size=(train_size, train_size), mode='bilinear',
                               align_corners=False).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed_epoch(batches, step, device, warmup_steps, max_steps):
    """images/s of one epoch, not counting the first `warmup_steps` steps."""
    images = steps = 0
    started = None
    for index, (x, y) in enumerate(batches):
        if index == warmup_steps:
            sync(device)
            started = time.perf_counter()
        step(x, y)
        if index >= warmup_steps:
            images += x.shape[0]
            steps += 1
        if max_steps and index + 1 >= max_steps:
            break
    sync(device)
    seconds = time.perf_counter() - started if started else float('nan')
    return images / seconds if steps else float('nan'), steps


def synthetic_batches(count, batch, crop):
    x = torch.randint(0, 255, (batch, 3, crop, crop), dtype=torch.uint8)
    y = torch.randint(0, 1000, (batch,))
    for _ in range(count):
        yield x, y


def run(args):
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    torch.manual_seed(0)
    model = resnet50().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = make_step(model, optimizer, device, args.train_size)
    shards = sorted(glob.glob(os.path.join(args.data, '**', '*.tfrecord'), recursive=True))
    if not shards:
        raise SystemExit(f'no *.tfrecord under {args.data}')
    results = {'device': str(device), 'batch': args.batch, 'workers': args.workers,
               'crop': args.crop, 'train_size': args.train_size, 'epochs': []}
    if device.type == 'cuda':
        results['device_name'] = torch.cuda.get_device_name(device)
    print(f'{len(shards)} shards under {args.data}; device {device}; batch {args.batch}; '
          f'{args.workers} workers')
    for epoch in range(1, args.epochs + 1):
        loader = DataLoader(ShardDataset(shards, args.crop, epoch), batch_size=args.batch,
                            num_workers=args.workers, pin_memory=device.type == 'cuda',
                            persistent_workers=False, prefetch_factor=4 if args.workers else None,
                            drop_last=True)
        real, steps = timed_epoch(loader, step, device, args.warmup_steps, args.steps)
        synthetic, _ = timed_epoch(synthetic_batches(steps + args.warmup_steps, args.batch,
                                                     args.crop),
                                   step, device, args.warmup_steps, 0)
        ratio = real / synthetic
        results['epochs'].append({'epoch': epoch, 'mount_images_per_s': real,
                                  'synthetic_images_per_s': synthetic, 'ratio': ratio,
                                  'steps': steps})
        print(f'epoch {epoch}: mount {real:8.1f} img/s   synthetic {synthetic:8.1f} img/s   '
              f'ratio {ratio:.3f}   ({steps} timed steps)')
    return results


def self_contained(args):
    """Start SeaweedFS here, generate shards, mount them with cachefs, and run on the mount."""
    from cachefs.demo.dataset import make_tfrecord_shards
    from cachefs.demo.seaweed import SeaweedServer, upload_tree
    workdir = Path(tempfile.mkdtemp(prefix='cachefs-train-'))
    server = SeaweedServer(workdir / 'seaweedfs', log_path=workdir / 'seaweedfs.log')
    mountpoint = workdir / 'mnt'
    mountpoint.mkdir()
    mounted = False
    try:
        make_tfrecord_shards(workdir / 'shards', count=args.shards, shard_size=args.shard_size,
                             seed=5)
        server.start()
        server.create_bucket('train')
        upload_tree(server.client(), 'train', 'shards/', workdir / 'shards')
        env = dict(os.environ, **server.env())
        subprocess.run([sys.executable, '-m', 'cachefs', 'mount', 's3://train/shards',
                        str(mountpoint), '--endpoint-url', server.endpoint, '--cache-dir',
                        str(workdir / 'cache'), '--profile', 'training'], env=env, check=True)
        mounted = True
        args.data = str(mountpoint)
        return run(args)
    finally:
        if mounted:
            subprocess.run([sys.executable, '-m', 'cachefs', 'umount', str(mountpoint)])
        server.stop(timeout=2)
        subprocess.run(['rm', '-rf', str(workdir)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', help='folder (a cachefs mount) holding *.tfrecord shards')
    parser.add_argument('--self-contained', action='store_true',
                        help='start SeaweedFS, generate shards and mount them here')
    parser.add_argument('--quick', action='store_true',
                        help='CPU-sized run: small images, batch 8, 6 steps, 2 epochs, 4 shards')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--workers', type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument('--crop', type=int, default=176, help='crop of the stored images')
    parser.add_argument('--train-size', type=int, default=224, help='size the model sees')
    parser.add_argument('--steps', type=int, default=0, help='steps per epoch (0: all data)')
    parser.add_argument('--warmup-steps', type=int, default=5)
    parser.add_argument('--device', default=None)
    parser.add_argument('--shards', type=int, default=24)
    parser.add_argument('--shard-size', type=int, default=64 << 20)
    parser.add_argument('--json-out', help='write the figures here as JSON')
    args = parser.parse_args()
    if torch is None:
        raise SystemExit('bench/train.py needs PyTorch (pip install torch; torchvision optional)')
    if args.quick:
        args.batch, args.steps, args.epochs, args.warmup_steps = 8, 6, 2, 2
        args.crop, args.train_size, args.workers = 64, 64, 2
        args.shards, args.shard_size = 4, 8 << 20
    if not args.self_contained and not args.data:
        parser.error('give --data MOUNT or --self-contained')
    results = self_contained(args) if args.self_contained else run(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
