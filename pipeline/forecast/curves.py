"""Learning-curve forms fitted to a method's test error by training size, and their extrapolation.

The forms are those the published comparisons rank best for extrapolation (names as in LCDB, Mohr et al.
2022): ``pow2`` the plain power law e = η·n^γ, ``pow3`` the power law with a floor e = α + η·n^γ (Hoiem et
al. 2021), ``mmf4`` a saturating curve in log n (used from four sizes on). Each is fitted by weighted least
squares, every observation weighted by its own noise (the test set's binomial noise plus the spread of
training seeds), from several starts. The forms are then weighted by their error on the largest measured
size held out: extrapolation error, not in-sample fit, is what tells a form that extrapolates (Alabdulmohsin
et al. 2022). The parametric bootstrap of the observations gives the fit's own spread.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares


@dataclass(frozen=True)
class Points:
    """Measured accuracies by training size; a size may repeat (training seeds)."""

    n: np.ndarray
    acc: np.ndarray
    sd: np.ndarray  # each observation's noise, in accuracy

    def __post_init__(self):
        for name in ("n", "acc", "sd"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))

    @property
    def sizes(self) -> np.ndarray:
        return np.unique(self.n)

    def below(self, n: float) -> Points:
        keep = self.n < n
        return Points(self.n[keep], self.acc[keep], self.sd[keep])

    def at(self, n: float) -> np.ndarray:
        return self.acc[self.n == n]

    def with_acc(self, acc: np.ndarray) -> Points:
        return Points(self.n, acc, self.sd)


@dataclass(frozen=True)
class Form:
    name: str
    n_params: int

    def error(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Test error at ``x`` = n / (the largest measured size): scaled so every form is well conditioned."""
        x = np.asarray(x, dtype=float)
        if self.name == "pow2":
            return np.exp(p[0]) * x ** p[1]
        if self.name == "pow3":
            return p[0] + np.exp(p[1]) * x ** p[2]
        xd = x ** p[3]  # mmf4: from a (few images) down to the floor c, the bend at b, its sharpness d
        b = np.exp(p[2])
        return (p[0] * b + p[1] * xd) / (b + xd)

    def starts(self, e: np.ndarray) -> tuple[list[np.ndarray], tuple[list[float], list[float]]]:
        """Starting points and bounds from the observed errors ``e`` (the floor stays below the lowest)."""
        lo_e, top = max(float(e.min()), 1e-6), float(np.log(max(float(e.max()), 1e-6)) + 3)
        floor = lo_e * 0.999
        if self.name == "pow2":
            return [np.array([np.log(lo_e), g]) for g in (-0.2, -0.5, -1.0)], ([-20, -3], [top, 0])
        if self.name == "pow3":
            grid = itertools.product((0.0, 0.5 * floor, 0.9 * floor), (-0.3, -0.7))
            starts = [np.array([a, np.log(max(lo_e - a, 1e-6)), g]) for a, g in grid]
            return starts, ([0, -20, -3], [floor, top, -0.01])
        grid = itertools.product((0.0, 0.5 * floor), (-1.0, 1.0), (0.5, 1.5))
        starts = [np.array([min(float(e.max()) * 1.5, 1.0), c, lb, d]) for c, lb, d in grid]
        return starts, ([0, 0, -12, 0.05], [1.0, floor, 12, 5])


FORMS = {f.name: f for f in (Form("pow2", 2), Form("pow3", 3), Form("mmf4", 4))}


def fit(form: Form, pts: Points, scale: float, start: np.ndarray | None = None) -> np.ndarray | None:
    """The form's parameters by weighted least squares, or None when it has more parameters than sizes.
    ``start``: one starting point instead of the grid (a bootstrap refit starts from the fit it perturbs)."""
    if len(pts.sizes) < form.n_params:
        return None
    x, e, w = pts.n / scale, 1 - pts.acc, 1 / np.maximum(pts.sd, 1e-4)
    starts, bounds = form.starts(e)
    starts = starts if start is None else [start]
    best = None
    for p0 in starts:
        p0 = np.clip(p0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        r = least_squares(lambda p: (form.error(x, p) - e) * w, p0, bounds=bounds, method="trf")
        if best is None or r.cost < best.cost:
            best = r
    return best.x


def usable(pts: Points) -> list[Form]:
    return [f for f in FORMS.values() if len(pts.sizes) >= f.n_params]


def holdout_errors(pts: Points) -> dict[str, float | None]:
    """Each form's error (accuracy, measured minus forecast) at the largest size, fitted without it."""
    top = pts.sizes.max()
    rest, truth = pts.below(top), float(pts.at(top).mean())
    out: dict[str, float | None] = {}
    for form in usable(pts):
        p = fit(form, rest, top)
        out[form.name] = None if p is None else truth - (1 - float(form.error(np.array([1.0]), p)[0]))
    return out


def form_weights(pts: Points) -> dict[str, float]:
    """Inverse squared held-out error (plus the held-out point's own noise); a form that cannot be held out
    yet (too few sizes) gets the typical error of those that could, so it neither wins nor loses by default."""
    errors = holdout_errors(pts)
    known = [abs(v) for v in errors.values() if v is not None]
    typical = float(np.sqrt(np.mean(np.square(known)))) if known else 1.0
    noise = float(np.mean(pts.sd[pts.n == pts.sizes.max()] ** 2))
    raw = {k: 1 / ((typical if v is None else v) ** 2 + noise) for k, v in errors.items()}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


class Ensemble:
    """The weighted forms fitted to ``pts``; ``accuracy(n)`` is their weighted forecast."""

    def __init__(self, pts: Points, weights: dict[str, float] | None = None, near: Ensemble | None = None):
        if len(pts.sizes) < 2:
            raise ValueError("a learning curve needs at least two training sizes")
        self.pts, self.scale = pts, float(pts.sizes.max())
        self.weights = weights if weights is not None else form_weights(pts)
        starts = near.params if near is not None else {}
        fitted = {k: fit(FORMS[k], pts, self.scale, starts.get(k)) for k in self.weights}
        self.params = {k: p for k, p in fitted.items() if p is not None}
        total = sum(self.weights[k] for k in self.params)
        self.weights = {k: self.weights[k] / total for k in self.params}

    def accuracy(self, n) -> np.ndarray:
        x = np.atleast_1d(np.asarray(n, dtype=float)) / self.scale
        e = sum(w * FORMS[k].error(x, self.params[k]) for k, w in self.weights.items())
        return np.clip(1 - e, 0.0, 1.0)

    def bootstrap(self, n, draws: int = 200, seed: int = 0) -> np.ndarray:
        """Forecasts at ``n`` refitted on observations redrawn from their noise (draws x len(n))."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(draws):
            acc = np.clip(self.pts.acc + self.pts.sd * rng.standard_normal(len(self.pts.acc)), 1e-4, 1 - 1e-4)
            out.append(Ensemble(self.pts.with_acc(acc), self.weights, near=self).accuracy(n))
        return np.array(out)


def plain_power_law(pts: Points, n: float) -> float:
    """The naive baseline: e = η·n^γ by ordinary least squares in log-log, through every observation."""
    slope, intercept = np.polyfit(np.log(pts.n), np.log(np.maximum(1 - pts.acc, 1e-6)), 1)
    return float(1 - np.exp(intercept + slope * np.log(n)))


def last_value(pts: Points) -> float:
    """The other naive baseline (LCDB's last1): the largest measured size's accuracy, carried forward."""
    return float(pts.at(pts.sizes.max()).mean())
