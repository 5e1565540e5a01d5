"""Read TFRecord shards from a cachefs mount with tf.data (TensorFlow 2).

    python examples/tf_data.py /mnt/imagenet --epochs 2

The shards are those of `cachefs.demo.dataset.make_tfrecord_shards`: each record is a 24-byte
little-endian header (magic, shard, index, label u32, height u16, width u16, channels u8, 3 pad
bytes) followed by height x width x 3 uint8 pixels. For shards of tf.train.Example records,
replace `parse_sample` with tf.io.parse_single_example. Every epoch reads the shards in a new
order, several at a time, and shuffles records within a buffer; TensorFlow checks each
record's CRC. Prints records, rate and the same label checksum as pytorch_dataloader.py.
"""

import argparse
import hashlib
import time
from pathlib import Path

import tensorflow as tf

HEADER_SIZE = 24


def parse_sample(record, crop):
    def field(offset, size, dtype):
        return tf.io.decode_raw(tf.strings.substr(record, offset, size), dtype)[0]

    label = field(12, 4, tf.int32)
    height = tf.cast(field(16, 2, tf.uint16), tf.int32)
    width = tf.cast(field(18, 2, tf.uint16), tf.int32)
    pixels = tf.io.decode_raw(
        tf.strings.substr(record, HEADER_SIZE, tf.strings.length(record) - HEADER_SIZE), tf.uint8)
    image = tf.reshape(pixels, tf.stack([height, width, 3]))
    return tf.image.resize_with_crop_or_pad(image, crop, crop), label


def make_dataset(root, workers, batch_size, crop, seed):
    shards = sorted(str(path) for path in Path(root).rglob('*.tfrecord'))
    if not shards:
        raise SystemExit(f'no *.tfrecord files under {root}')
    files = tf.data.Dataset.from_tensor_slices(shards).shuffle(
        len(shards), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=8 << 20),
        cycle_length=workers, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return (records.shuffle(1024, seed=seed)
            .map(lambda record: parse_sample(record, crop), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('root', help='folder with the *.tfrecord shards (a cachefs mount)')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--workers', type=int, default=4, help='shards read at once')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--crop', type=int, default=160)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    dataset = make_dataset(args.root, args.workers, args.batch_size, args.crop, args.seed)
    for epoch in range(1, args.epochs + 1):
        start = time.monotonic()
        labels = []
        for images, batch_labels in dataset:
            # a training step goes here: model(tf.cast(images, tf.float32) / 255), loss, gradients
            labels += batch_labels.numpy().tolist()
        seconds = time.monotonic() - start
        checksum = hashlib.sha256(','.join(map(str, sorted(labels))).encode()).hexdigest()
        print(f'epoch {epoch}: {len(labels)} records in {seconds:.2f}s = '
              f'{len(labels) / max(seconds, 1e-9):.0f} samples/s, labels {checksum[:12]}')


if __name__ == '__main__':
    main()
