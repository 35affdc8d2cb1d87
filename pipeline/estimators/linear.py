"""Linear heads that stay cheap at 50,000+ images: every C (or alpha) of a grid in one pass.

On tens of thousands of images a full-batch solver is bound by memory bandwidth:
scikit-learn's L-BFGS logistic regression reads the whole matrix every iteration
and needs a hundred or more iterations per C, cold or warm-started
(``benchmarks/NOTES.md``). ``LinearHead`` instead trains one linear model per C
side by side on the same float32 minibatches, so the data is read once an
epoch for the whole grid while each minibatch sits in cache; the objective is
scikit-learn's (``C * sum(loss) + ||W||^2 / 2``, softmax loss for ``logreg``,
LinearSVC's one-vs-rest squared hinge for ``linear_svm``), minimised by Adam
with a cosine-decayed step; the C with the best final validation accuracy is kept.

``RidgeHead`` is the near-free baseline: one Gram matrix (accumulated in
float64, chunk by chunk), one eigendecomposition, then every alpha in
closed form.
"""

from __future__ import annotations

import math
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if

from pipeline.estimators.contract import binary_scores, fit_data, predict_data
from pipeline.estimators.tuning import edge_values, gram_products, progress_bar, row_chunks

LOSSES = ("log", "squared_hinge")
_CHUNK = 8192


def _accuracy_per_head(X: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Accuracy of each of the G heads packed side by side in W (d, G*k)."""
    hits = np.zeros(W.shape[1] // k)
    for s in range(0, len(X), _CHUNK):
        Z = (X[s : s + _CHUNK] @ W + b).reshape(-1, W.shape[1] // k, k)
        hits += (Z.argmax(2) == y[s : s + _CHUNK, None]).sum(0)
    return hits / max(len(X), 1)


class _Linear(ClassifierMixin, BaseEstimator):
    """A fitted ``coef_`` (classes x features, one row per class even for two) and ``intercept_``,
    scored in float32."""

    def _scores(self, X) -> np.ndarray:
        return self._raw(predict_data(self, X))

    def _raw(self, X: np.ndarray) -> np.ndarray:
        """Scores of an already validated float32 X (tuning scores one X for many settings)."""
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X):
        return binary_scores(self._scores(X))

    def predict(self, X):
        best = np.argmax(self._scores(X), axis=1)  # validates (and checks fitted) first
        return self.classes_[best]


class LinearHead(_Linear):
    """L2-penalised linear classifier on standardised float32 features, minibatch-trained.

    ``tune`` trains the whole C grid at once; ``fit`` trains the one ``C``.
    """

    def __init__(
        self,
        loss: str = "log",
        C: float = 1.0,
        epochs: int | None = None,
        batch_size: int = 512,
        learning_rate: float = 0.01,
        seed: int = 0,
    ):
        self.loss = loss
        self.C = C
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed

    def _n_epochs(self, n: int) -> int:
        if self.epochs:
            return int(self.epochs)
        steps = max(1, n // self._batch(n))
        return int(min(200, max(10, math.ceil(1500 / steps))))  # enough steps to converge on small sets too

    def _batch(self, n: int) -> int:
        return int(max(16, min(self.batch_size, n // 8)))

    def _train(self, X, y, Cs, X_val=None, y_val=None, desc: str | None = None):
        """Train one head per C side by side; returns (W, b, val accuracy per head at the end)."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        X, y = fit_data(self, X, y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        n, d = X.shape
        k, g = len(self.classes_), len(Cs)
        lam = np.repeat(1.0 / (np.asarray(Cs, dtype=np.float64) * n), k).astype(np.float32)[None, :]
        rng = np.random.default_rng(self.seed)
        W = np.zeros((d, g * k), np.float32)
        b = np.zeros(g * k, np.float32)
        mW, vW, mb, vb = np.zeros_like(W), np.zeros_like(W), np.zeros_like(b), np.zeros_like(b)
        onehot = np.eye(k, dtype=np.float32)
        bs, epochs = self._batch(n), self._n_epochs(n)
        total, t = epochs * (n // bs), 0
        have_val = X_val is not None and len(y_val)
        yv = np.searchsorted(self.classes_, y_val) if have_val else None
        acc = np.full(g, np.nan)
        with progress_bar(epochs, desc, unit="epoch") as bar:
            for _ in range(epochs):
                perm = rng.permutation(n)
                for start in range(0, n - bs + 1, bs):
                    idx = np.sort(perm[start : start + bs])
                    xb, tb = X[idx], onehot[yi[idx]]
                    Z = (xb @ W + b).reshape(bs, g, k)
                    if self.loss == "log":
                        Z -= Z.max(axis=2, keepdims=True)
                        np.exp(Z, out=Z)
                        Z /= Z.sum(axis=2, keepdims=True)
                        D = Z - tb[:, None, :]
                    else:
                        sign = 2.0 * tb[:, None, :] - 1.0
                        D = -2.0 * sign * np.maximum(0.0, 1.0 - sign * Z)
                    D = D.reshape(bs, g * k) / bs
                    gW = xb.T @ D
                    gW += lam * W
                    t += 1
                    lr = self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * t / total))
                    for p, grad, m, v in ((W, gW, mW, vW), (b, D.sum(axis=0), mb, vb)):
                        m *= 0.9
                        m += 0.1 * grad
                        v *= 0.999
                        v += 0.001 * grad * grad
                        p -= (lr / (1 - 0.9**t)) * m / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
                if have_val:
                    acc = _accuracy_per_head(X_val, W, b, yv, k)
                    bar.set_postfix(best_val=f"{acc.max():.4f}")
                bar.update()
        # the last epoch's weights (the step has decayed to zero), not the best epoch's: picking the
        # maximum of a noisy val curve over epochs would make val an optimistic score
        return W, b, acc

    def _keep(self, W: np.ndarray, b: np.ndarray, j: int) -> None:
        k = len(self.classes_)
        self.coef_ = np.ascontiguousarray(W[:, j * k : (j + 1) * k].T)
        self.intercept_ = b[j * k : (j + 1) * k].copy()

    def fit(self, X, y):
        W, b, _ = self._train(X, y, [self.C])
        self._keep(W, b, 0)
        return self

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        """All of ``grid['C']`` in one training run; a best C at the grid's edge extends it (two steps further,
        once). Returns (best params, val accuracy, seconds) and keeps the best head as fitted."""
        t0 = time.perf_counter()
        Cs = sorted(grid.get("C", [self.C]))
        W, b, acc = self._train(X, y, Cs, X_val, y_val, desc)
        j = int(np.argmax(acc))
        tried = list(Cs)
        extra = edge_values(Cs, Cs[j], "C")
        if extra:
            W2, b2, acc2 = self._train(X, y, extra, X_val, y_val, f"{desc} (grid extended)" if desc else None)
            tried += extra
            if acc2.max() > acc[j]:
                W, b, acc, Cs, j = W2, b2, acc2, extra, int(np.argmax(acc2))
        edge_values(sorted(tried), Cs[j], "C", extend=False)  # still at the edge: say so
        self._keep(W, b, j)
        self.C = float(Cs[j])
        self.val_accuracy_ = float(acc[j])
        return {"C": self.C}, self.val_accuracy_, time.perf_counter() - t0

    @available_if(lambda self: self.loss == "log")
    def predict_proba(self, X):
        """Softmax of the class scores (the model ``loss='log'`` trains); absent for the squared hinge."""
        Z = self._scores(X)
        Z = Z - Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        return P / P.sum(axis=1, keepdims=True)


class RidgeHead(_Linear):
    """RidgeClassifier's model (targets -1/+1 per class, intercept unpenalised) with every alpha
    from one eigendecomposition of the train Gram matrix."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _decompose(self, X, y):
        X, y = fit_data(self, X, y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        n = len(X)
        T = 2.0 * np.eye(len(self.classes_))[yi] - 1.0
        mean = X.mean(axis=0, dtype=np.float64)
        gram, xty = gram_products(row_chunks(X), T)
        gram -= n * np.outer(mean, mean)
        xty -= np.outer(mean, T.sum(axis=0))
        evals, evecs = np.linalg.eigh(gram)
        return np.maximum(evals, 0.0), evecs, evecs.T @ xty, mean, T.mean(axis=0)

    def _set(self, evals, evecs, proj, mean, t_mean, alpha: float) -> None:
        W = evecs @ (proj / (evals + alpha)[:, None])
        self.coef_ = np.ascontiguousarray(W.T, dtype=np.float32)
        self.intercept_ = (t_mean - mean @ W).astype(np.float32)

    def fit(self, X, y):
        self._set(*self._decompose(X, y), self.alpha)
        return self

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        t0 = time.perf_counter()
        parts = self._decompose(X, y)
        alphas = sorted(grid.get("alpha", [self.alpha]))
        scores: dict[float, float] = {}
        X_val = predict_data(self, X_val)  # validated once for the whole grid

        def score(values):
            for a in values:
                self._set(*parts, a)
                scores[a] = float(np.mean(self.classes_[np.argmax(self._raw(X_val), axis=1)] == y_val))

        score(alphas)
        best = max(sorted(scores), key=lambda a: scores[a])
        extra = edge_values(alphas, best, "alpha")
        if extra:
            score(extra)
            best = max(sorted(scores), key=lambda a: scores[a])
            edge_values(sorted(scores), best, "alpha", extend=False)
        self.alpha = float(best)
        self._set(*parts, self.alpha)
        self.val_accuracy_ = scores[best]
        return {"alpha": self.alpha}, scores[best], time.perf_counter() - t0
