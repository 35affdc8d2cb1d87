"""Tuning a head on the validation split without a grid of independent cold fits.

Three means, each measured in ``benchmarks/NOTES.md``:

* preprocessing fitted once per feature set in chunks and applied as one float32 affine map
  into a single scaled copy (never in place: the shared arrays stay bit-identical), so no worker
  holds its own float32 or float64 copy of the training matrix;
* ``path_search``: a coarse pass over every other grid value in ascending
  order (each fit warm-started from the previous one when the estimator can),
  stopped once two coarse values in a row score below the best, then the
  skipped neighbours of the best;
* a best value at the edge of the grid extends the grid two steps (once), and
  is reported when it is still at the edge.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 8192


@contextmanager
def progress_bar(total: int, desc: str | None, unit: str = "fit"):
    """One tqdm bar per head (grid points or epochs, elapsed, best val so far); silent off a terminal."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=None if desc else True, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def edge_values(values: list[float], best: float, name: str, extend: bool = True, steps: int = 2) -> list[float]:
    """Values beyond the grid's edge when ``best`` sits on it (same log step); with ``extend=False`` only
    the warning that the best value is still at the edge of everything tried."""
    values = sorted(values)
    if len(values) < 2 or best not in (values[0], values[-1]) or min(values) <= 0:
        return []
    top = best == values[-1]
    ratio = values[-1] / values[-2] if top else values[1] / values[0]
    if not extend:
        log.warning(
            "warning: best %s=%g is at the %s edge of the values tried (%g..%g); the optimum may lie beyond",
            name,
            best,
            "upper" if top else "lower",
            values[0],
            values[-1],
        )
        return []
    new = [float(best * ratio**i) if top else float(best / ratio**i) for i in range(1, steps + 1)]
    log.info("  best %s=%g is at the edge of the grid: trying %s", name, best, ", ".join(f"{v:g}" for v in new))
    return new


def path_search(
    fit_score: Callable[[float], float], estimator, values: list[float], name: str, desc: str | None = None
) -> tuple[float, float, dict[float, float], object, float]:
    """Coarse-to-fine search of one parameter; ``fit_score(v)`` fits ``estimator`` at v (warm-starting from
    its current state when it supports it) and returns the val score.

    Returns (best value, best score, score per value, a copy of the estimator fitted at the best value,
    seconds spent fitting that copy)."""
    values = sorted(values)
    scores: dict[float, float] = {}
    best: list = [None, -np.inf, None, 0.0]

    def run(v: float, bar) -> float:
        t0 = time.perf_counter()
        s = fit_score(v)
        seconds = time.perf_counter() - t0
        scores[v] = s
        if s > best[1]:
            best[:] = [v, s, copy.deepcopy(estimator), seconds]
        bar.set_postfix({name: f"{v:g}", "best_val": f"{best[1]:.4f}"})
        bar.update()
        return s

    coarse = values[::2] + ([values[-1]] if (len(values) - 1) % 2 else [])
    with progress_bar(len(coarse), desc) as bar:
        below = 0
        for v in coarse:
            below = below + 1 if run(v, bar) < best[1] else 0
            if below == 2:  # past the peak: larger values only fit the training set harder
                break
        i = values.index(best[0])
        fine = [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values) and values[j] not in scores]
        bar.total += len(fine)
        for v in fine:
            run(v, bar)
        extra = edge_values(values, best[0], name)
        bar.total += len(extra)
        for v in extra:
            if run(v, bar) < best[1]:
                break
        if extra:
            edge_values(sorted(scores), best[0], name, extend=False)
    return best[0], best[1], scores, best[2], best[3]


def row_chunks(X: np.ndarray) -> Iterator[np.ndarray]:
    return (X[s : s + _CHUNK] for s in range(0, len(X), _CHUNK))


def column_stats(chunks: np.ndarray | Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per column in float64 from an array or a stream of row chunks, in one pass
    (sums shifted by the first chunk's mean) with no full-size temporary."""
    shift = total = sq = None
    n = 0
    for c in row_chunks(chunks) if isinstance(chunks, np.ndarray) else chunks:
        c = c.astype(np.float64)
        if shift is None:
            shift = c.mean(axis=0) if len(c) else np.zeros(c.shape[1])
            total, sq = np.zeros(c.shape[1]), np.zeros(c.shape[1])
        c -= shift
        total += c.sum(axis=0)
        sq += (c * c).sum(axis=0)
        n += len(c)
    mean = total / max(n, 1)
    return mean + shift, np.maximum(sq / max(n, 1) - mean**2, 0.0)


def gram_products(chunks: Iterable[np.ndarray], T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X'X and X'T accumulated in float64 from float32 row chunks of X (T's rows aligned with X's)."""
    T = T.astype(np.float32, copy=False)
    gram = xty = None
    start = 0
    for c in chunks:
        if gram is None:
            gram, xty = np.zeros((c.shape[1], c.shape[1])), np.zeros((c.shape[1], T.shape[1]))
        gram += (c.T @ c).astype(np.float64)
        xty += (c.T @ T[start : start + len(c)]).astype(np.float64)
        start += len(c)
    return gram, xty


def fit_scalers(pre, X: np.ndarray):
    """Fit ``pre`` (StandardScalers, optionally per column block) on X, the scalers' statistics computed in
    chunks: scikit-learn's own fit makes two full-size temporaries of X."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pre.fit(X[: min(len(X), 256)])  # the structure; the statistics follow

    def refit(est, cols):
        if isinstance(est, StandardScaler):
            mean, var = column_stats(X[:, cols] if cols is not None else X)
            scale = np.sqrt(var)
            scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
            est.mean_, est.var_, est.scale_, est.n_samples_seen_ = mean, var, scale, len(X)
        elif isinstance(est, Pipeline):
            for _, step in est.steps:
                refit(step, cols)
        elif isinstance(est, ColumnTransformer):
            for _, sub, c in est.transformers_:
                if not isinstance(sub, str):
                    refit(sub, c)

    refit(pre, None)
    return pre


def affine(pre, d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with ``pre.transform(x) == a * x + b`` column by column, or None when pre is not such a map."""
    probe = np.vstack([np.zeros(d), np.ones(d), np.random.default_rng(0).normal(size=d)]).astype(np.float32)
    out = np.asarray(pre.transform(probe), dtype=np.float64)
    if out.shape != probe.shape:
        return None
    b, a = out[0], out[1] - out[0]
    if not np.allclose(out[2], a * probe[2] + b, rtol=1e-4, atol=1e-4) or np.any(a == 0):
        return None
    return a.astype(np.float32), b.astype(np.float32)


def transformed(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * X + b`` column by column into a new float32 array, chunk by chunk (no float64 temporaries).

    Never in place: the shared feature arrays are read by every head after this one, and undoing
    ``x * a + b`` in float32 is not the identity (rounding changes many entries in one round trip), which
    made a head's inputs depend on the heads run before it."""
    out = np.empty(X.shape, dtype=np.float32)
    for s in range(0, len(X), _CHUNK):
        np.multiply(X[s : s + _CHUNK], a, out=out[s : s + _CHUNK])
        out[s : s + _CHUNK] += b
    return out
