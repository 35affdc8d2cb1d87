"""How sure the numbers are: bootstrap intervals for test accuracies and for paired differences,
the exact McNemar test, and Wilson intervals for small subgroups.

Resampling test images with replacement and counting the correct ones is a
binomial draw (one method) or a multinomial draw over the four agree/disagree
cells (two methods on the same images), so the bootstrap is drawn from those
distributions directly: exact, and O(draws) instead of O(draws x images).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LEVEL = 0.95
DRAWS = 10_000


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def accuracy_ci(correct: np.ndarray, level: float = LEVEL, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy over test images."""
    correct = np.asarray(correct, dtype=bool)
    return counts_ci(float(correct.mean()) if len(correct) else 0.0, len(correct), level, draws, seed)


def counts_ci(accuracy: float, n: int, level: float = LEVEL, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """The same interval from the accuracy and the number of test images alone (all it depends on)."""
    if not n or not np.isfinite(accuracy):
        return float("nan"), float("nan")
    n = int(n)
    rng = np.random.default_rng(seed)
    return _bounds(rng.binomial(n, accuracy, draws) / n, level)


def paired_delta_ci(
    a_correct: np.ndarray, b_correct: np.ndarray, level: float = LEVEL, draws: int = DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same images, with its paired bootstrap interval."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    cells = np.array([np.sum(a & ~b), np.sum(~a & b)], dtype=float) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [cells[0], cells[1], 1 - cells.sum()], size=draws)
    diff = (counts[:, 0] - counts[:, 1]) / n
    return float(cells[0] - cells[1]), *_bounds(diff, level)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test: (A right & B wrong, A wrong & B right, two-sided p)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return only_a, only_b, p


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of k successes in n: sound for small n and for 0% / 100%."""
    from scipy.stats import norm

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def correct_by_id(pred: pd.DataFrame) -> pd.Series:
    return pd.Series((pred["y_true"] == pred["y_pred"]).to_numpy(), index=pred["id"].astype(str))


def unpaired(row: pd.Series) -> bool:
    """Whether a row's method and its fine-tune scored different test images (so Δ is on the common ones)."""
    n = [row.get(k, np.nan) for k in ("n_paired", "n_scored", "n_base")]
    return bool(np.isfinite(n).all() and len(set(n)) > 1)


def paired_correct(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Which test images each of two prediction sets got right, on the images both scored, in one order."""
    ca, cb = correct_by_id(a), correct_by_id(b)
    both = ca.index.intersection(cb.index)
    return ca[both].to_numpy(), cb[both].to_numpy()


def with_uncertainty(table: pd.DataFrame, preds: dict[int, pd.DataFrame], baselines: dict[str, int]) -> pd.DataFrame:
    """Add acc_ci_low/high to every row with predictions, and delta_pt, delta_ci_low/high, mcnemar_p and
    n_paired against its backbone's fine-tune (``baselines``: backbone -> row index), all computed on the
    test images both scored: a head that dropped images (``--metadata-missing drop``) is compared with
    the fine-tune on the images it kept, never its accuracy on fewer images against one on all."""
    out = table.copy()
    for col in (
        "acc_ci_low",
        "acc_ci_high",
        "delta_ci_low",
        "delta_ci_high",
        "mcnemar_p",
        "n_scored",
        "n_paired",
        "n_base",
    ):
        out[col] = np.nan
    for i, pred in preds.items():
        out.loc[i, ["acc_ci_low", "acc_ci_high"]] = accuracy_ci((pred["y_true"] == pred["y_pred"]).to_numpy())
        out.loc[i, "n_scored"] = len(pred)
        base = baselines.get(out.loc[i, "backbone"])
        if base is None or base == i or base not in preds:
            continue
        c, b = paired_correct(pred, preds[base])
        out.loc[i, ["n_paired", "n_base"]] = len(c), len(preds[base])
        if not len(c):
            out.loc[i, "delta_pt"] = np.nan
            continue
        delta, lo, hi = paired_delta_ci(c, b)
        out.loc[i, ["delta_pt", "delta_ci_low", "delta_ci_high"]] = delta * 100, lo * 100, hi * 100
        out.loc[i, "mcnemar_p"] = mcnemar(c, b)[2]
    return out
