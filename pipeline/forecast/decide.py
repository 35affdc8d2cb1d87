"""From the evidence to a forecast: the fine-tune's accuracy at a size not run, its interval, its chance of
beating the best head, the size where it starts to, and its cost.

The interval adds, as independent errors, the fit's own spread (parametric bootstrap), one run's noise at
the target (test-set binomial and training seed), and the extrapolation error measured in backtests at the
same ratio; the stated level is ``record.LEVEL``. "Cannot tell yet" when the ratio is beyond what any curve
fit extrapolates honestly, or when the interval holds the best head's accuracy: the call is then a coin.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy.stats import norm

from pipeline.forecast import calibration
from pipeline.forecast.cost import CostModel
from pipeline.forecast.curves import Ensemble, Points
from pipeline.forecast.evidence import Evidence, seed_sd_at
from pipeline.forecast.record import LEVEL, Forecast

MAX_RATIO = 20.0
GRID = 120  # sizes looked at for the crossover, log-spaced
Z = float(norm.ppf(0.5 + LEVEL / 2))


def own_backtest(pts: Points) -> list[calibration.Case]:
    """This curve's own test: its largest size forecast from the smaller ones (needs three sizes)."""
    sizes = pts.sizes
    if len(sizes) < 3:
        return []
    forecast = float(Ensemble(pts.below(sizes[-1])).accuracy(sizes[-1])[0])
    truth = float(pts.at(sizes[-1]).mean())
    return [calibration.Case("this curve", int(sizes[-1]), int(sizes[-2]), forecast, truth)]


class Curves:
    """The fine-tune's forecast curve with its total sd at any size, and the best head's curve beside it."""

    def __init__(self, ev: Evidence, cases: list[calibration.Case], draws: int, grid: np.ndarray):
        self.ev, self.cases = ev, cases
        self.ft = Ensemble(ev.finetune)
        self.largest = float(ev.finetune.sizes.max())
        self.grid = grid
        self.boot_sd = self.ft.bootstrap(grid, draws=draws).std(axis=0)
        self.head_fit = Ensemble(ev.head_curve) if len(ev.head_curve.sizes) >= 2 else None
        pts = ev.head_curve
        self.head_sizes = pts.sizes
        self.head_means = np.array([pts.at(s).mean() for s in self.head_sizes])

    def accuracy(self, n) -> np.ndarray:
        return self.ft.accuracy(n)

    def sd_parts(self, n: float) -> tuple[float, float, float]:
        acc = float(self.accuracy(n)[0])
        fit = float(np.interp(np.log(n), np.log(self.grid), self.boot_sd))
        seed = float(seed_sd_at(n, self.ev.seed_sd, self.ev.seed_n))
        noise = float(np.sqrt(acc * (1 - acc) / self.ev.n_test + seed**2))
        return fit, noise, calibration.extrapolation_sd(n / self.largest, self.cases)

    def sd(self, n: float) -> float:
        return float(np.sqrt(sum(p**2 for p in self.sd_parts(n))))

    def head(self, n: float) -> float:
        """The best head's accuracy: measured where it was (log-interpolated between sizes), else its fit."""
        sizes = self.head_sizes
        if self.head_fit is None or sizes[0] <= n <= sizes[-1]:
            return float(np.interp(np.log(n), np.log(sizes), self.head_means))
        return float(self.head_fit.accuracy(n)[0])

    def p_beats(self, n: float) -> float:
        return float(norm.cdf((float(self.accuracy(n)[0]) - self.head(n)) / max(self.sd(n), 1e-9)))

    @functools.cached_property
    def p_grid(self) -> np.ndarray:
        """P(fine-tune beats the head) at every size of the grid: the crossover and the band both read it."""
        return np.array([self.p_beats(n) for n in self.grid])


def crossover(curves: Curves) -> tuple[float, float, float]:
    """Where P(fine-tune beats the head) first reaches one half, and where it reaches (1 ± LEVEL) / 2."""
    p = curves.p_grid

    def first(level: float) -> float:
        above = np.nonzero(p >= level)[0]
        return float(curves.grid[above[0]]) if len(above) and (p[above[0] :] >= level).all() else float("nan")

    return first(0.5), first((1 - LEVEL) / 2), first((1 + LEVEL) / 2)


def build(ev: Evidence, cases: list[calibration.Case], top: float, draws: int = 200) -> Curves:
    """The curves from the smallest measured size to ``top``, calibrated with ``cases`` and this curve's own
    backtest."""
    grid = np.geomspace(float(ev.finetune.sizes.min()), top, GRID)
    return Curves(ev, cases + own_backtest(ev.finetune), draws, grid)


def band(curves: Curves) -> pd.DataFrame:
    """The forecast curve with its interval and the head beside it, at every size of the grid (for the plot)."""
    rows = []
    for n, p in zip(curves.grid, curves.p_grid):
        acc, half = float(curves.accuracy(n)[0]), Z * curves.sd(n)
        rows.append({"n": n, "accuracy": acc, "low": acc - half, "high": acc + half, "head": curves.head(n),
                     "p_beats_head": p})  # fmt: skip
    return pd.DataFrame(rows)


def forecast(ev: Evidence, *, dataset: str, backbone: str, target: int, n_full: int, max_epochs: int,
             cases: list[calibration.Case], draws: int = 200) -> Forecast:  # fmt: skip
    """The record for ``target`` training images (``n_full`` or a multiple of it)."""
    curves = build(ev, cases, max(target, 2 * n_full), draws)
    return at(curves, dataset=dataset, backbone=backbone, target=target, n_full=n_full, max_epochs=max_epochs)


def at(curves: Curves, *, dataset: str, backbone: str, target: int, n_full: int, max_epochs: int) -> Forecast:
    ev, cases = curves.ev, curves.cases
    acc = float(curves.accuracy(target)[0])
    fit_sd, noise_sd, ext_sd = curves.sd_parts(target)
    half = Z * curves.sd(target)
    ratio = target / curves.largest
    head = curves.head(target)
    cost = CostModel.fit(ev.runs, max_epochs)
    undecided = ratio > MAX_RATIO or acc - half <= head <= acc + half
    next_n = min(2 * curves.largest, n_full) if undecided and 2 * curves.largest <= n_full else float("nan")
    cross, cross_lo, cross_hi = crossover(curves)
    return Forecast(
        dataset=dataset,
        backbone=backbone,
        target_n=int(target),
        n_full=int(n_full),
        accuracy=acc,
        low=max(acc - half, 0.0),
        high=min(acc + half, 1.0),
        measured_sizes=" ".join(str(int(s)) for s in ev.finetune.sizes),
        ratio=ratio,
        form_weights=" ".join(f"{k} {w:.2f}" for k, w in curves.ft.weights.items()),
        fit_sd=fit_sd,
        noise_sd=noise_sd,
        extrapolation_sd=ext_sd,
        backtest_cases=len(cases),
        best_head=ev.head,
        best_head_accuracy=head,
        p_beats_head=curves.p_beats(target),
        crossover_n=cross,
        crossover_low=cross_lo,
        crossover_high=cross_hi,
        cost_seconds=cost.seconds(target),
        forecast_seconds=ev.forecast_seconds,
        status="cannot tell" if undecided else "forecast",
        next_n=next_n,
        next_seconds=cost.seconds(next_n) if np.isfinite(next_n) else float("nan"),
        measured_accuracy=ev.measured_full if target == n_full else float("nan"),
    )
