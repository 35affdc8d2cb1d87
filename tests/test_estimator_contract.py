"""Every custom estimator passes scikit-learn's own estimator checks, with no expected failure, at its
defaults and at non-default settings (another solver, k = 1 and 3, fixed epochs, a fixed gamma): a setting
is part of the contract too (``CosineKNN(n_neighbors=3)`` once failed subset invariance).

A small MLP (32 hidden units, up to 20 epochs) keeps its checks to about a minute; the contract is
the same at any size.
"""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.estimators.knn import CosineKNN
from pipeline.estimators.linear import LinearHead, RidgeHead
from pipeline.estimators.mlp import KerasMLP
from pipeline.estimators.nystroem import NystroemHead
from pipeline.estimators.svm import KernelSVC
from pipeline.heads import BlockWeight

ESTIMATORS = [
    RidgeHead(),
    LinearHead("log"),
    LinearHead("squared_hinge"),
    KernelSVC(),
    NystroemHead(n_components=50),
    CosineKNN(),
    BlockWeight(),
    KerasMLP(hidden=32, max_epochs=20, learning_rate=0.01),
]
NON_DEFAULT = [
    RidgeHead(alpha=100.0),
    LinearHead("log", C=10.0, epochs=3),  # the minibatch solver instead of scikit-learn's exact one
    LinearHead("squared_hinge", C=0.1, epochs=3, batch_size=16),
    KernelSVC(C=10.0, gamma=0.5),
    NystroemHead(C=10.0, gamma=0.5, n_components=20),
    CosineKNN(n_neighbors=1),
    CosineKNN(n_neighbors=3),
    CosineKNN(n_neighbors=5, temperature=1.0),
    KerasMLP(hidden=16, dropout=0.0, epochs=5, learning_rate=0.01),  # fixed epochs, no early stopping
]


@parametrize_with_checks(ESTIMATORS + NON_DEFAULT)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("est", [RidgeHead(), LinearHead("log", epochs=3), LinearHead("squared_hinge", epochs=3)])
def test_binary_decision_function_is_one_column_favouring_classes_1(est):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.where(X[:, 0] > 0, "yes", "no")
    with pytest.raises(NotFittedError):
        est.predict(X)
    est.fit(X, y)
    scores = est.decision_function(X)
    assert scores.shape == (60,)
    assert (est.predict(X) == np.where(scores > 0, est.classes_[1], est.classes_[0])).all()


def test_mlp_fit_is_seeded_without_touching_global_random_state():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    first = KerasMLP(hidden=16, max_epochs=3, seed=5).fit(X, y).predict_proba(X)
    assert np.array_equal(np.random.get_state()[1], state)  # the process's global RNG was not reset
    np.random.random(100)  # other code drawing in between changes nothing
    second = KerasMLP(hidden=16, max_epochs=3, seed=5).fit(X, y).predict_proba(X)
    assert np.array_equal(first, second)
    other = KerasMLP(hidden=16, max_epochs=3, seed=6).fit(X, y).predict_proba(X)
    assert not np.array_equal(first, other)
