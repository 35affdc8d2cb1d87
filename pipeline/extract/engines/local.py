"""The local engine: images decoded in parallel (unreadable files skipped) while the runtime's forward pass
runs on each batch in this process. Lossless files are decoded without TensorFlow (``data.decode``: the
same pixels), so an extraction whose model is already converted never imports it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from pipeline.data import decode
from pipeline.extract.engines import Batch


def batches(paths: list[str], size: int, batch_size: int, forward: Callable) -> Iterator[Batch]:
    """``forward``: images -> [outputs]; ``paths`` in the order the positions refer to."""
    if decode.lossless(paths):
        source = decode.batches(paths, size, batch_size)
    else:
        from pipeline.data import image_dataset

        source = ((images, index.numpy()) for images, index in image_dataset(paths, size, batch_size))
    for images, index in source if paths else ():
        index = np.asarray(index)
        yield Batch(index, forward(images), int(index[-1]) + 1)
