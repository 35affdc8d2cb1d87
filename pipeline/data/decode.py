"""Lossless images (PNG, BMP) decoded without TensorFlow: Pillow decodes, and a NumPy bilinear resize
computes exactly what ``tf.image.resize`` does (half-pixel centres, no antialiasing, the same float32
operations in the same order: bit-identical, tested). A cached extraction then never imports TensorFlow,
which took 12 of the 40 s of a whole 6,000-image ``extract`` (NOTES). Lossy formats keep TensorFlow's
decoder: another JPEG decoder gives other pixels.
"""

from __future__ import annotations

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


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(image, (size, size))`` (bilinear) of an (H, W, 3) array, as float32."""
    image = image.astype(np.float32, copy=False)
    y0, y1, wy = _axis(image.shape[0], size)
    x0, x1, wx = _axis(image.shape[1], size)
    wx, wy = wx[None, :, None], wy[:, None, None]
    top, bottom = image[y0], image[y1]
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * wx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * wx
    return top + (bottom - top) * wy


def load(path: str, size: int) -> np.ndarray | None:
    """One image as ``data.load_image`` makes it, or None when it cannot be read. A rare 16-bit or float
    image goes to TensorFlow's decoder, whose conversion to 8 bits Pillow does not share."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB")) if img.mode in _MODES else None
    except (OSError, ValueError, SyntaxError):
        return None
    if rgb is None:
        from pipeline.data import load_image

        try:
            return load_image(path, size).numpy()
        except Exception:  # noqa: BLE001 (tf.errors.* and friends: unreadable, as tf.data's ignore_errors says)
            return None
    return resize(rgb, size)


def batches(paths: list[str], size: int, batch_size: int, threads: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images, index)`` batches like ``data.image_dataset``'s (an unreadable file leaves a gap in
    ``index``), decoded by ``threads`` threads a few batches ahead of the consumer."""

    def one(start: int):
        loaded = [(i, load(paths[i], size)) for i in range(start, min(start + batch_size, len(paths)))]
        kept = [(i, img) for i, img in loaded if img is not None]
        if not kept:
            return np.zeros((0, size, size, 3), np.float32), np.zeros(0, np.int64)
        return np.stack([img for _, img in kept]), np.asarray([i for i, _ in kept], np.int64)

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(threads) as pool:
        ahead = [pool.submit(one, s) for s in starts[: 2 * threads]]
        for k in range(len(starts)):
            images, index = ahead[k].result()
            ahead[k] = None  # the consumer holds the batch; the pool need not
            if k + 2 * threads < len(starts):
                ahead.append(pool.submit(one, starts[k + 2 * threads]))
            if len(index):
                yield images, index
