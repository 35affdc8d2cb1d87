"""`nystroem`: an RBF-kernel classifier that uses every training image, for 50,000+ images.

The exact RBF SVM (``KernelSVC``) needs the n x n kernel, so it trains on a 10,000-image subsample
(``--rbf-max-train``). Here the kernel is approximated by its Nyström features (Williams & Seeger 2001;
scikit-learn's ``Nystroem``): m landmark images, features ``k(x, landmarks) K_mm^(-1/2)``, whose inner
products approximate the kernel, computed in float32 chunks (scikit-learn's transformer works in float64:
a 50,000 x 4,000 float64 copy is 1.6 GB). A minibatch linear SVM (``LinearHead``, every C at once) on
the standardised Nyström features is then an RBF SVM on all the images at a linear model's cost.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.estimators.contract import binary_scores, fit_data, predict_data
from pipeline.estimators.linear import LinearHead
from pipeline.estimators.svm import KernelSVC, rbf_kernel32
from pipeline.estimators.tuning import column_stats

CHUNK = 4096  # rows per kernel block


class NystroemHead(ClassifierMixin, BaseEstimator):
    """RBF kernel (``gamma="scale"`` as in SVC) approximated by ``n_components`` landmarks drawn at random
    from the training images, then an L2-penalised linear classifier (squared hinge) tuned over C."""

    def __init__(
        self, C: float = 1.0, gamma: float | str = "scale", n_components: int = 4000, batch_size: int = 512, seed=0
    ):
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.batch_size = batch_size
        self.seed = seed

    def _map(self, X: np.ndarray) -> np.ndarray:
        """Fit the feature map on X (gamma, landmarks, K_mm^(-1/2), standardisation) and return X mapped."""
        self.gamma_ = KernelSVC(gamma=self.gamma)._gamma(X)
        m = min(self.n_components, len(X))
        rng = np.random.default_rng(self.seed)
        self.landmarks_ = X[np.sort(rng.choice(len(X), m, replace=False))]
        K = rbf_kernel32(self.landmarks_, self.landmarks_, self.gamma_).astype(np.float64)
        U, S, Vt = np.linalg.svd(K)
        S = np.maximum(S, 1e-12)  # as scikit-learn's Nystroem: a singular landmark set stays finite
        self.normalization_ = ((U / np.sqrt(S)) @ Vt).astype(np.float32)
        self.mean_, self.scale_ = 0.0, 1.0
        Z = self._features(X)
        mean, var = column_stats(Z)
        self.mean_, self.scale_ = mean.astype(np.float32), np.sqrt(np.maximum(var, 1e-12)).astype(np.float32)
        Z -= self.mean_
        Z /= self.scale_
        return Z

    def _features(self, X: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The standardised Nyström features of X, in float32 for training; in float64 for scoring, so a row's
        scores do not depend on which rows share its BLAS blocks (float32 products differ by ~1e-7)."""
        Z = np.empty((len(X), len(self.landmarks_)), dtype=dtype)
        normalization = self.normalization_.astype(dtype, copy=False)
        for s in range(0, len(X), CHUNK):
            K = rbf_kernel32(X[s : s + CHUNK], self.landmarks_, self.gamma_, dtype=dtype)
            Z[s : s + CHUNK] = K @ normalization.T
            Z[s : s + CHUNK] -= self.mean_
            Z[s : s + CHUNK] /= self.scale_
        return Z

    def _linear(self) -> LinearHead:
        return LinearHead("squared_hinge", C=self.C, batch_size=self.batch_size, seed=self.seed)

    def fit(self, X, y):
        X, y = fit_data(self, X, y)
        self.linear_ = self._linear().fit(self._map(X), y)
        self.classes_ = self.linear_.classes_
        return self

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        """The feature map once, then every C of ``grid`` in one minibatch run (``LinearHead.tune``)."""
        X, y = fit_data(self, X, y)
        Z = self._map(X)
        Zv = self._features(predict_data(self, X_val))
        self.linear_ = self._linear()
        params, acc, seconds = self.linear_.tune(Z, y, Zv, y_val, grid, desc)
        self.C, self.classes_ = params["C"], self.linear_.classes_
        return params, acc, seconds

    def _all_scores(self, X) -> np.ndarray:
        X = predict_data(self, X)  # validates (and checks fitted) first
        W, b = self.linear_.coef_.T.astype(np.float64), self.linear_.intercept_
        return np.vstack([self._features(X[s : s + CHUNK], np.float64) @ W + b for s in range(0, len(X), CHUNK)])

    def decision_function(self, X):
        return binary_scores(self._all_scores(X))

    def predict(self, X):
        best = np.argmax(self._all_scores(X), axis=1)  # validates (and checks fitted) first
        return self.classes_[best]
