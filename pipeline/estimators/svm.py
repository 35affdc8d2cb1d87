"""The RBF SVM head: scikit-learn's libsvm on a precomputed float32 kernel (``rbf_kernel32``), so each C of
the grid reuses one kernel instead of libsvm evaluating it pair by pair in double precision."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.estimators.contract import fit_data, predict_data

_KCHUNK = 256  # rows of a kernel block against up to rbf_max_train columns, in float64


def rbf_kernel32(
    A: np.ndarray, B: np.ndarray, gamma: float, out: np.ndarray | None = None, dtype=np.float32
) -> np.ndarray:
    """exp(-gamma |a - b|^2) from one float32 matrix product (BLAS), written into ``out`` when given;
    ``dtype=np.float64`` where a row's value must not depend on the rows computed beside it."""
    A, B = A.astype(dtype, copy=False), B.astype(dtype, copy=False)
    K = A @ B.T
    K *= -2.0
    K += np.einsum("ij,ij->i", A, A)[:, None]
    K += np.einsum("ij,ij->i", B, B)[None, :]
    np.maximum(K, 0.0, out=K)
    K *= -gamma
    np.exp(K, out=K)
    if out is None:
        return K
    out[...] = K
    return out


class KernelSVC(ClassifierMixin, BaseEstimator):
    """RBF SVC (scikit-learn's libsvm) on a precomputed kernel.

    libsvm evaluates the kernel itself in double precision, one pair at a time,
    for every fit and again to score, per C: on thousands of images that dominates
    the grid search. Here the train and validation kernels
    come from one float32 matrix product each and every C of the grid reuses
    them; predictions need only the kernel against the support vectors.
    ``gamma="scale"`` means what it means in SVC: 1 / (n_features * X.var()).
    """

    SEARCH_VAL = 5000  # validation images scoring each C of the search

    def __init__(self, C: float = 1.0, gamma: float | str = "scale"):
        self.C = C
        self.gamma = gamma

    def _gamma(self, X) -> float:
        if self.gamma == "scale":  # X.var() over all entries, from chunked column statistics (no float64 copy)
            from pipeline.estimators.tuning import column_stats

            mean, var = column_stats(X)
            total = float(np.mean(var + mean**2) - np.mean(mean) ** 2)
            return 1.0 / (X.shape[1] * total) if total > 0 else 1.0
        return float(self.gamma)

    def _train_kernel(self, X: np.ndarray) -> np.ndarray:
        """The float64 train kernel libsvm reads, filled block by block from float32 products."""
        K = np.empty((len(X), len(X)), dtype=np.float64)
        for s in range(0, len(X), _KCHUNK):
            rbf_kernel32(X[s : s + _KCHUNK], X, self.gamma_, out=K[s : s + _KCHUNK])
        return K

    def _fit_kernel(self, K: np.ndarray, y) -> None:
        from sklearn.svm import SVC

        # a small row cache: with the kernel precomputed a "kernel evaluation" is a lookup
        self.svc_ = SVC(kernel="precomputed", C=self.C, cache_size=16).fit(K, y)
        self.classes_ = self.svc_.classes_
        self.n_train_ = K.shape[0]

    def fit(self, X, y):
        X, y = fit_data(self, X, y)
        self.gamma_ = self._gamma(X)
        self._fit_kernel(self._train_kernel(X), y)
        self.support_vectors_ = X[self.svc_.support_]
        return self

    def _predict_kernel(self, K: np.ndarray) -> np.ndarray:
        """Predictions from a chunk's kernel against all training rows (libsvm's precomputed layout)."""
        return self.svc_.predict(K.astype(np.float64))

    def predict(self, X):
        X = predict_data(self, X)
        out = []
        for s in range(0, len(X), _KCHUNK):  # the kernel against the support vectors only; zeros elsewhere
            full = np.zeros((min(_KCHUNK, len(X) - s), self.n_train_), dtype=np.float64)
            full[:, self.svc_.support_] = rbf_kernel32(X[s : s + _KCHUNK], self.support_vectors_, self.gamma_)
            out.append(self.svc_.predict(full))
        return np.concatenate(out) if out else np.zeros(0, dtype=self.classes_.dtype)

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        """Both kernels once, then a coarse-to-fine search over C; the best fit is kept."""
        from pipeline.estimators import tuning

        X, y = fit_data(self, X, y)
        t0 = time.perf_counter()
        self.gamma_ = self._gamma(X)
        mats = {"K": self._train_kernel(X)}
        # The search scores C on at most SEARCH_VAL validation images, their kernel in float16 (values in
        # [0, 1], 3 significant digits): a quarter of the memory of all of val in float32, which next to
        # the float64 train kernel is what bounds the peak. The kept model is then scored on all of val.
        pick = np.arange(len(X_val))
        if len(pick) > self.SEARCH_VAL:
            pick = np.sort(np.random.default_rng(0).choice(len(pick), self.SEARCH_VAL, replace=False))
        K_val = mats["K_val"] = np.empty((len(pick), len(X)), dtype=np.float16)
        for s in range(0, len(pick), _KCHUNK):
            K_val[s : s + _KCHUNK] = rbf_kernel32(X_val[pick[s : s + _KCHUNK]], X, self.gamma_)
        del K_val
        y_search = np.asarray(y_val)[pick]
        kernel_seconds = time.perf_counter() - t0

        def fit_score(c: float) -> float:
            self.C = c
            self._fit_kernel(mats["K"], y)
            K_val = mats["K_val"]
            pred = [self._predict_kernel(K_val[s : s + _KCHUNK]) for s in range(0, len(K_val), _KCHUNK)]
            return float(np.mean(np.concatenate(pred) == y_search))

        c, _, _, best, fit_seconds = tuning.path_search(fit_score, self, list(grid.get("C", [self.C])), "C", desc)
        mats.clear()  # the kernels go before the exact scoring below
        self.__dict__.update(best.__dict__)
        self.support_vectors_ = X[self.svc_.support_]
        t0 = time.perf_counter()
        acc = float(np.mean(self.predict(X_val) == y_val))
        return {"C": c}, acc, kernel_seconds + fit_seconds + time.perf_counter() - t0
