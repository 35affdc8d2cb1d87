"""Lossless images (PNG, BMP) decoded without TensorFlow: Pillow decodes, and a NumPy bilinear resize
computes exactly what ``tf.image.resize`` does (half-pixel centres, no antialiasing, the same float32
operations in the same order: bit-identical, tested). A cached extraction then never imports TensorFlow.
Lossy formats keep TensorFlow's decoder: another JPEG decoder gives other pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

LOSSLESS = (".png", ".bmp")
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # 8-bit: converted to RGB as TensorFlow's decoder does


def lossless(paths: list[str]) -> bool:
    return bool(paths) and all(p.lower().endswith(LOSSLESS) for p in paths)


def _axis(n_in: int, n_out: int):
    """Source rows (or columns) below and above each output one, and the weight of the one above."""
    x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
    low = np.floor(x)
    return (
        np.clip(low, 0, n_in - 1).astype(np.int64),
        np.clip(np.ceil(x), 0, n_in - 1).astype(np.int64),
        (x - low).astype(np.float32),
    )


@functools.lru_cache(maxsize=64)
def _plan(height: int, width: int, size: int):
    """What a resize from (height, width) needs, computed once per shape (a dataset has few shapes)."""
    y0, y1, wy = _axis(height, size)
    x0, x1, wx = _axis(width, size)
    below = np.minimum(np.arange(1, height + 1), height - 1)  # each source row's next (the last its own)
    return y0, y1, wy[:, None, None], x0, x1, wx[None, :, None], below, y1 == y0


def resize(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """``tf.image.resize(image, (size, size))`` (bilinear) of an (H, W, C) array, as float32, into ``out``
    when given. Each output value is computed with TensorFlow's float32 operations in its order (a blend of
    two columns within each of two rows, then of the two rows), but the column blend is done once per
    source row rather than once per output row, and the rows are gathered with ``np.take``: decoding runs
    beside the forward pass on the same cores, so its cost comes straight off extraction's speed."""
    image = image.astype(np.float32, copy=False)
    y0, y1, wy, x0, x1, wx, below, same = _plan(image.shape[0], image.shape[1], size)
    left = np.take(image, x0, axis=1)
    rows = np.take(image, x1, axis=1)
    np.subtract(rows, left, out=rows)
    np.multiply(rows, wx, out=rows)
    np.add(left, rows, out=rows)  # every source row blended across its columns
    out = np.empty((size, size, image.shape[2]), np.float32) if out is None else out
    top = np.take(rows, y0, axis=0)  # each output row's upper source row
    if len(rows) <= size:  # upscaling: the difference of neighbouring rows, once per source row
        step = np.take(rows, below, axis=0)
        np.subtract(step, rows, out=step)
        np.take(step, y0, axis=0, out=out)
        out[same] = 0.0  # the edges (and exact source rows): the same row twice, a difference of 0
    else:
        np.take(rows, y1, axis=0, out=out)
        np.subtract(out, top, out=out)
    np.multiply(out, wy, out=out)
    np.add(top, out, out=out)
    return out


def load(path: str, size: int, out: np.ndarray | None = None) -> np.ndarray | None:
    """One image as ``data.load_image`` makes it (into ``out`` when given), or None when it cannot be read.
    A rare 16-bit or float image goes to TensorFlow's decoder, whose conversion to 8 bits Pillow does not
    share."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            gray = np.asarray(img)[:, :, None] if img.mode == "L" else None
            rgb = np.asarray(img.convert("RGB")) if gray is None and img.mode in _MODES else None
    except (OSError, ValueError, SyntaxError):
        return None
    if gray is not None:  # TensorFlow repeats gray in R, G and B before resizing: resize once, then repeat
        out = np.empty((size, size, 3), np.float32) if out is None else out
        plane = resize(gray, size)[:, :, 0]
        for channel in range(3):  # one strided copy a channel: a broadcast over a last axis of 3 is far slower
            out[:, :, channel] = plane
        return out
    if rgb is not None:
        return resize(rgb, size, out)
    from pipeline.data import load_image

    try:
        pixels = load_image(path, size).numpy()
    except Exception:  # noqa: BLE001 (tf.errors.* and friends: unreadable, as tf.data's ignore_errors says)
        return None
    if out is None:
        return pixels
    out[...] = pixels
    return out


def threads_beside_the_model(cores: int) -> int:
    """Decoding threads for an extraction whose runtime already splits each batch over every core: one per
    four cores. More would take cores from the forward pass, which is the slower side on a small machine."""
    return max(1, cores // 4)


def batches(
    paths: list[str], size: int, batch_size: int, threads: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images, index)`` batches like ``data.image_dataset``'s (an unreadable file leaves a gap in
    ``index``), decoded by ``threads`` threads (default: ``threads_beside_the_model``) a few batches ahead
    of the consumer, each image straight into its batch."""
    from pipeline import resources

    threads = threads or threads_beside_the_model(resources.cores())

    def one(start: int):
        stop = min(start + batch_size, len(paths))
        images = np.empty((stop - start, size, size, 3), np.float32)
        kept = [i for i in range(start, stop) if load(paths[i], size, images[i - start]) is not None]
        if len(kept) < stop - start:  # close the gaps the unreadable ones left
            images = images[np.asarray(kept, np.int64) - start]
        return images, np.asarray(kept, np.int64)

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(threads) as pool:
        ahead = [pool.submit(one, s) for s in starts[: 2 * threads + 1]]
        for k in range(len(starts)):
            images, index = ahead[k].result()
            ahead[k] = None  # the consumer holds the batch; the pool need not
            if k + 2 * threads + 1 < len(starts):
                ahead.append(pool.submit(one, starts[k + 2 * threads + 1]))
            if len(index):
                yield images, index
