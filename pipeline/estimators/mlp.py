"""A one-hidden-layer Keras MLP as a scikit-learn estimator: it stops early on the fixed validation split
and keeps the epoch count for the refit (Keras is imported only when it is fitted or loaded)."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.estimators.contract import fit_data, predict_data


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
        """The trained network's softmax, computed in float64 from its weights (dropout is off at
        inference): a float32 matrix product rounds a row differently by where it falls in the kernel's
        blocks, so Keras' forward pass gave an image other probabilities in another batch order, which
        scikit-learn's estimator contract rejects."""
        X = predict_data(self, X)
        (w1, b1, w2, b2) = (np.asarray(w, np.float64) for w in self.model_.get_weights())
        logits = np.maximum(np.asarray(X, np.float64) @ w1 + b1, 0.0) @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

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
