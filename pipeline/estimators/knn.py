"""Cosine k-NN as a scikit-learn estimator, tuned on the fixed validation split by its own ``tune``: the
neighbours are found once for the largest k and every k is scored from them (the DINOv2 / CLIP-benchmark
k-NN protocol), cheaper than a grid of independent fits."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import normalize

from pipeline.estimators.contract import fit_data, predict_data

_CHUNK = 1024


class CosineKNN(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, votes weighted by exp(similarity / temperature)."""

    def __init__(self, n_neighbors: int = 10, temperature: float = 0.07):
        self.n_neighbors = n_neighbors
        self.temperature = temperature

    def fit(self, X, y):
        X, y = fit_data(self, X, y)
        self.classes_, self.y_ = np.unique(y, return_inverse=True)
        self.X_ = normalize(X)
        return self

    def _neighbours(self, X, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k similarities and indices, in chunks so memory stays chunk x n_train.

        A row's neighbours must not depend on the rows beside it (scikit-learn's subset-invariance check): a
        BLAS product rounds a row differently in another block, which reorders near-ties. So the product
        only shortlists 2k candidates; their similarities are recomputed row by row in float64, and ties
        go to the lower training index."""
        Xq = normalize(predict_data(self, X))
        k = min(k, len(self.X_))
        m = min(2 * k + 2, len(self.X_))
        sims, idx = [], []
        for start in range(0, len(Xq), _CHUNK):
            q = Xq[start : start + _CHUNK]
            cand = np.argpartition(-(q @ self.X_.T), m - 1, axis=1)[:, :m]
            q64 = q.astype(np.float64)
            exact = np.stack([np.einsum("ij,ij->i", q64, self.X_[cand[:, j]].astype(np.float64)) for j in range(m)], 1)
            order = np.lexsort((cand, -exact), axis=1)[:, :k]
            sims.append(np.take_along_axis(exact, order, axis=1))
            idx.append(np.take_along_axis(cand, order, axis=1))
        return np.vstack(sims), np.vstack(idx)

    def _vote(self, sims: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
        w = np.exp((sims[:, :k] - 1.0) / self.temperature)  # shifted: same argmax, no overflow
        votes = np.zeros((len(sims), len(self.classes_)), dtype=np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(sims)), k), self.y_[idx[:, :k]].ravel()), w.ravel())
        return votes

    def predict_proba(self, X):
        sims, idx = self._neighbours(X, self.n_neighbors)
        votes = self._vote(sims, idx, min(self.n_neighbors, idx.shape[1]))
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X):
        best = np.argmax(self.predict_proba(X), axis=1)  # validates (and checks fitted) first
        return self.classes_[best]

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        """Every k from one neighbour search; returns (best params, val accuracy, fit seconds)."""
        ks = sorted(grid.get("n_neighbors", [self.n_neighbors]))
        t0 = time.perf_counter()
        self.fit(X, y)
        fit_seconds = time.perf_counter() - t0
        sims, idx = self._neighbours(X_val, max(ks))
        best = (-1.0, ks[0])
        for k in ks:
            acc = float(np.mean(self.classes_[np.argmax(self._vote(sims, idx, min(k, idx.shape[1])), 1)] == y_val))
            if acc > best[0]:
                best = (acc, k)
        self.set_params(n_neighbors=best[1])
        return {"n_neighbors": best[1]}, best[0], fit_seconds
