"""The fine-tune's input pipeline: each image decoded and resized once, shuffled and augmented afresh
every epoch.

Decoding the files again every epoch would cost a large share of each epoch (benchmarks/NOTES.md). The
decoded pixels are the float32 output of ``data.load_image`` (the op extraction uses), kept as they are:
rounding them to uint8 would hand the fine-tune other pixels than the frozen side's cache was made from.
They stay in memory up to the budget and are spilled to a ``.npy`` file in the work folder beyond it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import image_dataset, steady

log = logging.getLogger(__name__)

_DECODE_BATCH = 256


@dataclass
class Decoded:
    """One split's images, decoded once: ``index`` is each kept image's position in the split (an
    unreadable file leaves a gap, as in ``data.image_dataset``)."""

    images: np.ndarray  # (n, size, size, 3) float32 0-255; an np.memmap when spilled
    labels: np.ndarray
    index: np.ndarray
    spilled: bool

    def __len__(self) -> int:
        return len(self.labels)


def nbytes(n_images: int, size: int) -> int:
    return n_images * size * size * 3 * 4


def decode(paths: list[str], labels: np.ndarray, size: int, budget: int, spill: Path) -> Decoded:
    """Every image through ``data.load_image`` once, into memory when ``budget`` bytes hold them, else into
    the file ``spill``."""
    shape = (len(paths), size, size, 3)
    spilled = nbytes(len(paths), size) > budget
    if spilled:
        gb = nbytes(len(paths), size) / 2**30
        log.info("decoded images need %.1f GB, over the memory budget: kept in %s", gb, spill)
        images = np.lib.format.open_memmap(spill, mode="w+", dtype=np.float32, shape=shape)
    else:
        images = np.empty(shape, np.float32)
    k, index = 0, []
    for batch, pos in image_dataset(paths, size, _DECODE_BATCH):
        b = batch.numpy()
        images[k : k + len(b)] = b
        index.append(pos.numpy())
        k += len(b)
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    labels = np.asarray(labels, np.int64)[index]
    return Decoded(images[:k], labels, index, spilled)


def batches(
    dec: Decoded, batch_size: int, shuffle_seed: int | None = None, pad_to: int | None = None, autotune: bool = False
):
    """``(images, labels)`` batches of decoded images; with ``shuffle_seed`` a new order every epoch (the
    same orders as ``data.image_dataset`` gives under that seed when every file is readable). ``pad_to``
    (a worker's shard, padded so that every worker runs as many steps as the others): ``(images, labels,
    weights)``, the padding repeating real images with weight 0, so no loss or accuracy counts them.
    ``autotune``: tf.data's own tuning, as before ``data.steady`` (for ``benchmarks/finetune_throughput.py``)."""
    import tensorflow as tf

    n = len(dec)
    total = max(n, pad_to or 0)
    size = dec.images.shape[1]
    ds = tf.data.Dataset.range(total)
    if shuffle_seed is not None:
        ds = ds.shuffle(total, seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(idx):
        real = idx % max(n, 1)
        return np.asarray(dec.images[real]), dec.labels[real], (idx < n).astype(np.float32)

    def load(idx):
        images, labels, weights = tf.numpy_function(gather, [idx], (tf.float32, tf.int64, tf.float32), stateful=False)
        images = tf.ensure_shape(images, (None, size, size, 3))
        labels, weights = tf.ensure_shape(labels, (None,)), tf.ensure_shape(weights, (None,))
        return (images, labels, weights) if pad_to is not None else (images, labels)

    if autotune:
        return ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return steady(ds.batch(batch_size).map(load, num_parallel_calls=2).prefetch(2))  # gathers: 2 overlap training
