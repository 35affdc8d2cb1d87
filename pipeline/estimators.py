"""Heads that scikit-learn does not ship in the form the protocol needs: cosine k-NN
and a one-hidden-layer Keras MLP, both as scikit-learn estimators.

Both are tuned on the fixed validation split by their own ``tune`` method, which
is cheaper than a grid of independent fits: k-NN finds the neighbours once for
the largest k and scores every k from them (the DINOv2 / CLIP-benchmark k-NN
protocol); the MLP stops early on the validation split and keeps the epoch
count for a refit.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import normalize

from pipeline.contract import fit_data, predict_data

_CHUNK = 1024
_KCHUNK = 256  # rows of a kernel block against up to rbf_max_train columns, in float64


def _onehot(y: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(y), n), dtype=np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


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


class KerasMLP(ClassifierMixin, BaseEstimator):
    """Dense(hidden, relu) -> Dropout -> softmax, AdamW, early stopping on the validation loss.

    Picklable (joblib) through its weights, so it saves like every other head.
    """

    def __init__(
        self,
        hidden: int = 1024,
        dropout: float = 0.5,
        weight_decay: float = 1e-4,
        learning_rate: float = 1e-3,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 5,
        epochs: int | None = None,
        seed: int = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.epochs = epochs
        self.seed = seed

    def _build(self, dim: int, n_classes: int):
        """The network, every random draw seeded from ``seed`` (initialisers, dropout): no global RNG is
        reset, so fitting an MLP changes nothing else in the process."""
        import keras

        seeds = np.random.SeedSequence(self.seed).generate_state(3)
        init = [keras.initializers.GlorotUniform(seed=int(s)) for s in seeds[:2]]
        model = keras.Sequential(
            [
                keras.Input((dim,)),
                keras.layers.Dense(self.hidden, activation="relu", kernel_initializer=init[0]),
                keras.layers.Dropout(self.dropout, seed=int(seeds[2])),
                keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=init[1]),
            ]
        )
        opt = keras.optimizers.AdamW(self.learning_rate, weight_decay=self.weight_decay)
        model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, X, y, X_val=None, y_val=None):
        """With a validation split: early stopping on its loss, best epoch restored and kept in ``epochs_``.
        Without: ``epochs`` (or ``max_epochs``) epochs."""
        import keras
        import tensorflow as tf

        X, y = fit_data(self, X, y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        self.model_ = self._build(X.shape[1], len(self.classes_))
        kw = {"epochs": self.epochs or self.max_epochs}
        if X_val is not None:
            yv = np.searchsorted(self.classes_, y_val)
            # On val loss, not accuracy: the maximum of a noisy accuracy curve over many epochs is an
            # optimistic val score, which would then win the comparison of heads by val unfairly.
            stop = keras.callbacks.EarlyStopping("val_loss", patience=self.patience, restore_best_weights=True)
            kw.update(epochs=self.max_epochs, validation_data=(np.asarray(X_val, np.float32), yv), callbacks=[stop])
        batch = min(self.batch_size, max(16, len(X) // 16))  # small sets still get several steps an epoch
        # shuffled by a seeded tf.data op (Keras' own shuffle draws from the global TF seed)
        train = tf.data.Dataset.from_tensor_slices((X, yi)).shuffle(len(X), seed=self.seed).batch(batch)
        hist = self.model_.fit(train, verbose=0, **kw)
        if X_val is not None:
            best = int(np.argmin(hist.history["val_loss"]))
            self.epochs_ = best + 1
            self.val_accuracy_ = float(hist.history["val_accuracy"][best])
        else:
            self.epochs_ = kw["epochs"]
        return self

    def predict_proba(self, X):
        X = predict_data(self, X)  # direct calls in chunks: no predict-function retracing per call
        parts = [np.asarray(self.model_(X[i : i + 4096], training=False)) for i in range(0, len(X), 4096)]
        return np.vstack(parts) if parts else np.zeros((0, len(self.classes_)), np.float32)

    def predict(self, X):
        best = np.argmax(self.predict_proba(X), axis=1)  # validates (and checks fitted) first
        return self.classes_[best]

    def tune(self, X, y, X_val, y_val, grid: dict, desc: str | None = None) -> tuple[dict, float, float]:
        """Each grid point trained once with early stopping on val; the best model is kept as fitted."""
        from sklearn.model_selection import ParameterGrid

        best, best_model = None, None
        for params in ParameterGrid(grid or {}):
            est = self.__class__(**{**self.get_params(), **params})
            t0 = time.perf_counter()
            est.fit(X, y, X_val, y_val)
            seconds = time.perf_counter() - t0
            if best is None or est.val_accuracy_ > best[1]:
                best, best_model = ({**params, "epochs": est.epochs_}, est.val_accuracy_, seconds), est
        self.set_params(**best[0])
        self.__dict__.update({k: v for k, v in best_model.__dict__.items() if k.endswith("_")})
        return best

    def __getstate__(self):
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            state["_weights"] = model.get_weights()
        return state

    def __setstate__(self, state):
        weights = state.pop("_weights", None)
        self.__dict__.update(state)
        if weights is not None:
            self.model_ = self._build(weights[0].shape[0], weights[-1].shape[0])
            self.model_.set_weights(weights)


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
    for every fit and again to score: at 10,000 x 1,280 that is ~12 s to fit and
    as long to score 5,000 images, per C. Here the train and validation kernels
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
            from pipeline.tuning import column_stats

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
        from pipeline import tuning

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
