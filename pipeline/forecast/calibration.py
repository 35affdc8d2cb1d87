"""How far a forecast is from the truth it extrapolates to, as backtests measure it: the widening of every interval.

A fitted curve's own spread (bootstrap, noise) says how sure the fit is, not how wrong the form can be
beyond the data; plain power laws fitted on small subsets are known to err systematically (Mahmood et
al., CVPR 2022). So each interval is widened by the error that backtests measured at the same
extrapolation ratio: forecasts of fine-tunes that were then run (``backtests.csv``, written by
``benchmarks/forecast_backtest.py``), plus this curve's own backtest (its largest size forecast from the
smaller ones). The error is modelled as growing with the log of the ratio, as the fits' own spread does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

BACKTESTS = Path(__file__).with_name("backtests.csv")
COLUMNS = ["case", "target", "largest_measured", "forecast", "measured"]


@dataclass(frozen=True)
class Case:
    """One forecast set against the fine-tune that was then measured."""

    case: str
    target: int
    largest_measured: int
    forecast: float
    measured: float

    @property
    def ratio(self) -> float:
        return self.target / self.largest_measured

    @property
    def error(self) -> float:
        return self.measured - self.forecast


def read_cases(path: Path = BACKTESTS, leave_out: str | None = None) -> list[Case]:
    """The shipped backtests (``leave_out``: a case not to calibrate with, when that case is being judged)."""
    if not Path(path).exists():
        return []
    table = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {', '.join(missing)}")
    return [Case(*(r[c] for c in COLUMNS)) for _, r in table.iterrows() if r["case"] != leave_out]


def write_cases(cases: list[Case], path: Path = BACKTESTS) -> None:
    pd.DataFrame([{c: getattr(k, c) for c in COLUMNS} for k in cases], columns=COLUMNS).to_csv(path, index=False)


def error_per_log_ratio(cases: list[Case]) -> float:
    """κ in sd(ratio) = κ·ln(ratio): the root mean square of each case's error over its log ratio."""
    usable = [c for c in cases if c.ratio > 1]
    if not usable:
        return 0.0
    return float(np.sqrt(np.mean([(c.error / np.log(c.ratio)) ** 2 for c in usable])))


def extrapolation_sd(ratio: float, cases: list[Case]) -> float:
    """The measured extrapolation error (an sd, in accuracy) at ``ratio`` × the largest measured size."""
    return error_per_log_ratio(cases) * float(np.log(max(ratio, 1.0)))
