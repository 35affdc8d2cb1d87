"""The Nyström head: its features reproduce the RBF kernel, and it separates what no linear head can."""

import numpy as np

from pipeline.estimators.linear import LinearHead
from pipeline.estimators.nystroem import NystroemHead
from pipeline.estimators.svm import KernelSVC, rbf_kernel32


def _rings(n, seed):
    """Two concentric rings: no hyperplane separates them, an RBF kernel does."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(y == 1, 2.0, 1.0) + rng.normal(0, 0.1, n)
    X = np.c_[radius * np.cos(angle), radius * np.sin(angle), rng.normal(0, 0.1, (n, 2))]
    return X.astype(np.float32), y


def test_with_every_image_a_landmark_the_features_reproduce_the_rbf_kernel():
    X, y = _rings(80, 0)
    head = NystroemHead(n_components=80).fit(X, y)
    Z = (head._features(X) * head.scale_ + head.mean_).astype(np.float64)  # undo the standardisation
    K = rbf_kernel32(X, X, KernelSVC()._gamma(X))
    np.testing.assert_allclose(Z @ Z.T, K, atol=1e-3)


def test_it_separates_rings_that_a_linear_head_cannot_and_tunes_every_c_at_once():
    X, y = _rings(600, 1)
    Xv, yv = _rings(300, 2)
    linear = LinearHead("squared_hinge").fit(X, y)
    assert np.mean(linear.predict(Xv) == yv) < 0.7
    head = NystroemHead(n_components=100)
    params, acc, seconds = head.tune(X, y, Xv, yv, {"C": [0.01, 0.1, 1.0]})
    assert acc > 0.95 and np.mean(head.predict(Xv) == yv) == acc and params["C"] in (0.01, 0.1, 1.0, 3.0, 10.0)


def test_the_heads_stage_builds_it_from_the_registry_with_its_settings():
    from pipeline.config import Config
    from pipeline.extract.cache.reader import SplitData
    from pipeline.heads import fit_head

    splits = {
        s: SplitData(*_rings(n, k), np.arange(n))
        for k, (s, n) in enumerate((("train", 400), ("val", 200), ("test", 200)))
    }
    cfg = Config()
    cfg.heads.c_grid, cfg.heads.nystroem_components = (0.1, 1.0), 60
    model, r = fit_head("nystroem", "image", splits, 4, cfg.heads, 0)
    assert isinstance(model[-1], NystroemHead) and model[-1].n_components == 60 and len(model[-1].landmarks_) == 60
    assert r.scores["test_accuracy"] > 0.95 and r.params["C"] in (0.1, 1.0, 3.0, 10.0)
