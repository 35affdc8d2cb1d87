"""The local engine: tf.data decodes (in parallel, unreadable files skipped) while the runtime's forward
pass runs on each batch in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.data import image_dataset
from pipeline.extract.engines import Batch


def batches(paths: list[str], size: int, batch_size: int, forward: Callable) -> Iterator[Batch]:
    """``forward``: images -> [outputs]; ``paths`` in the order the positions refer to."""
    for images, index in image_dataset(paths, size, batch_size) if paths else ():
        index = index.numpy()
        yield Batch(index, forward(images), int(index[-1]) + 1)
