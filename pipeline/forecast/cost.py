"""What a fine-tune at a size not yet run will cost on this machine, from the small ones that ran.

A fine-tune's seconds are its phase 1, its learning-rate search and its phase-2 epochs. Each phase's
seconds per epoch grow linearly with the training images (each epoch also scores the fixed validation
split: the constant term), and the number of phase-2 epochs early stopping lets run grows with the data
more slowly; it is fitted as a power law of the size and capped at the configured maximum. The search
trains the same network as phase 2 for budgets counted in epochs, so its cost is counted in phase-2
epochs too (their median over the measured runs): whether a size needed a second rung is the search's
noise, and a line through a few such points would turn one extra rung into a slope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True)
class Run:
    """One measured fine-tune, as its results row records it."""

    n: int
    phase_one_seconds: float
    search_seconds: float
    phase_two_seconds: float
    phase_two_epochs: int

    @property
    def seconds(self) -> float:
        return self.phase_one_seconds + self.search_seconds + self.phase_two_seconds


def _linear(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = a + b·n with a, b ≥ 0 (more images never make an epoch cheaper)."""
    if len(np.unique(n)) < 2:
        return float(np.mean(y)), 0.0
    coef, _ = nnls(np.column_stack([np.ones_like(n), n]), y)
    return float(coef[0]), float(coef[1])


@dataclass(frozen=True)
class CostModel:
    phase_one: tuple[float, float]
    search_epochs: float  # the search's seconds in phase-2 epochs of the same size
    per_epoch: tuple[float, float]
    epochs: tuple[float, float]  # epochs = c · n^d
    max_epochs: int

    @classmethod
    def fit(cls, runs: list[Run], max_epochs: int) -> CostModel:
        if not runs:
            raise ValueError("no measured fine-tune to learn its cost from")
        n = np.array([r.n for r in runs], dtype=float)
        epochs = np.array([max(r.phase_two_epochs, 1) for r in runs], dtype=float)
        per_epoch = np.array([r.phase_two_seconds for r in runs]) / epochs
        if len(np.unique(n)) >= 2:
            d, log_c = np.polyfit(np.log(n), np.log(epochs), 1)
            d = float(np.clip(d, 0.0, 1.0))
            log_c = float(np.mean(np.log(epochs) - d * np.log(n)))
        else:
            d, log_c = 0.0, float(np.mean(np.log(epochs)))
        timed = per_epoch > 0  # runs whose phase-2 epochs took measurable time: the search's unit
        search_epochs = np.array([r.search_seconds for r in runs])[timed] / per_epoch[timed]
        return cls(
            _linear(n, np.array([r.phase_one_seconds for r in runs])),
            float(np.median(search_epochs)) if len(search_epochs) else 0.0,
            _linear(n, per_epoch),
            (float(np.exp(log_c)), d),
            max_epochs,
        )

    def phase_two_epochs(self, n: float) -> float:
        c, d = self.epochs
        return float(min(c * n**d, self.max_epochs))

    def seconds(self, n: float) -> float:
        """The whole fine-tune at ``n`` training images: phase 1, search and phase 2."""

        def at(ab):
            return ab[0] + ab[1] * n

        return at(self.phase_one) + (self.search_epochs + self.phase_two_epochs(n)) * at(self.per_epoch)
