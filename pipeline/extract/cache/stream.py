"""Reading one split of a cache in chunk-aligned row ranges, for heads that never load it whole
(``linear_probe``): memory is bounded by ``pool x unit x width`` floats, never by the cache.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.estimators.tuning import column_stats
from pipeline.extract.cache.reader import LAST

UNIT_ROWS = 256  # rows per read, rounded to whole storage chunks (the writer makes 256-row chunks)
POOL_UNITS = 32  # units drawn from all over the file and shuffled together: caches are often sorted by class


class CacheStream:
    """One split's layer set, read in chunk-aligned row ranges; ``reads`` records the rows of every read."""

    def __init__(self, path: Path, split: str, layers: list[str], unit_rows: int | None = None):
        self.path, self.split, self.layers = Path(path), split, list(layers)
        self._file = h5py.File(self.path, "r")
        g = self._file[split]
        self._sets = [g["embeddings"] if n == LAST else g["taps"][n] for n in self.layers]
        self.n = self._sets[0].shape[0]
        self.widths = [d.shape[1] for d in self._sets]
        self.width = sum(self.widths)
        unit_rows = unit_rows or UNIT_ROWS
        chunk = (self._sets[0].chunks or (unit_rows,))[0]
        self.unit = max(chunk, unit_rows // chunk * chunk)
        self.labels = g["labels"][()].astype(np.int64)
        self.reads: list[int] = []

    def ids(self) -> np.ndarray:
        return self._file[self.split]["ids"].asstr()[()].astype(object)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.width), dtype=np.float32)
        col = 0
        for d, w in zip(self._sets, self.widths, strict=True):
            d.read_direct(out, np.s_[start:stop], np.s_[:, col : col + w])
            col += w
        self.reads.append(stop - start)
        return out

    def units(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.unit, self.n)) for s in range(0, self.n, self.unit)]

    def batches(self, batch_size: int, rng: np.random.Generator | None = None):
        """(x, y) minibatches: in file order without ``rng``; else units in random order, pooled and shuffled."""
        units = self.units()
        if rng is not None:
            units = [units[i] for i in rng.permutation(len(units))]
        pool = POOL_UNITS if rng is not None else 1
        for p in range(0, len(units), pool):
            group = units[p : p + pool]
            x = np.concatenate([self.read(a, b) for a, b in group]) if len(group) > 1 else self.read(*group[0])
            y = np.concatenate([self.labels[a:b] for a, b in group])
            order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
            for s in range(0, len(y), batch_size):
                idx = order[s : s + batch_size]
                yield x[idx], y[idx]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-column mean and variance of this split, in one streaming pass."""
        return column_stats(self.read(a, b) for a, b in self.units())

    @property
    def embedding_width(self) -> int:
        """Width of the final embedding, the reference width layer blocks are scaled to."""
        return self._file[self.split]["embeddings"].shape[1]

    def close(self) -> None:
        self._file.close()
