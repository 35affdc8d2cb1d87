"""Heads at scale: the streaming linear_probe, the memory budget, grid edges, and the fast solvers
checked against the scikit-learn estimators they stand in for."""

import json
import logging

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.svm import SVC, LinearSVC

from pipeline import heads, results
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.estimators import tuning
from pipeline.estimators.linear import LinearHead, RidgeHead
from pipeline.estimators.svm import KernelSVC
from pipeline.extract.cache import stream
from pipeline.extract.cache.writer import write_cache
from pipeline.heads import budget, probe

CLASSES = ["a", "b", "c"]
N = {"train": 1200, "val": 300, "test": 300}


def _separable_cache(root, dim=16, chunk=64, seed=0):
    """Three well-separated classes in extract's cache layout, stored in small chunks."""
    rng = np.random.default_rng(seed)
    path = root / "artifacts" / "features" / "blobs" / "fake_net.h5"
    path.parent.mkdir(parents=True)
    centres = rng.normal(0, 4, (3, dim))
    splits = {}
    for s, n in N.items():
        y = rng.permutation(np.arange(n) % 3)
        X = (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32)
        splits[s] = {"embeddings": X, "labels": y, "ids": [f"{s}_{i}.png" for i in range(n)]}
    attrs = {"backbone": "fake_net", "class_names": json.dumps(CLASSES), "extract_seconds": 3.0}
    write_cache(path, attrs, splits, chunk_rows=chunk)
    (root / "data" / "blobs").mkdir(parents=True)
    return path


def _cfg(root) -> Config:
    cfg = Config()
    cfg.artifacts = str(root / "artifacts")
    cfg.data.dataset = str(root / "data" / "blobs")
    cfg.backbone.backbone = "fake_net"
    cfg.heads.layers = ("last",)
    cfg.heads.n_jobs = 1
    return cfg


def test_linear_probe_learns_separable_data_reading_chunks_not_the_cache(tmp_path, monkeypatch):
    path = _separable_cache(tmp_path)
    monkeypatch.setattr(stream, "UNIT_ROWS", 128)  # two 64-row storage chunks per read
    res, streams = probe.fit_probe(path, ["last"], [1e-4, 1e-2], 3, batch_size=32, max_epochs=4, patience=4)
    assert res.val_accuracy > 0.95 and res.decay in (1e-4, 1e-2)
    reads = streams["train"].reads
    assert max(reads) == 128 < N["train"]  # never more than one read unit at a time
    assert sum(reads) == N["train"] * (1 + 4)  # one statistics pass + one pass per epoch, nothing else
    pred = probe.predict(res.model, streams["test"])
    assert np.mean(pred == streams["test"].labels) > 0.95
    for s in streams.values():
        s.close()


def test_linear_probe_through_heads_writes_row_model_and_predictions(tmp_path):
    _separable_cache(tmp_path)
    cfg = _cfg(tmp_path)
    cfg.heads.heads = ("linear_probe",)
    cfg.heads.probe_epochs = 8
    out = heads.run(cfg)
    assert [r.head for r in out] == ["linear_probe"] and out[0].scores["test_accuracy"] > 0.95
    table = results.read_results(results.results_path(cfg.artifacts, "blobs"))
    assert list(table["method"]) == ["linear_probe"] and table["n_train"][0] == N["train"]
    stem = tmp_path / "artifacts" / "heads" / "blobs" / "fake_net" / "linear_probe"
    assert stem.with_suffix(".keras").exists() and json.loads(stem.with_suffix(".json").read_text())["params"]
    preds = (stem.parent / "linear_probe.predictions.csv").read_text().splitlines()
    assert len(preds) == N["test"] + 1


def test_memory_budget_refusal_is_one_line_naming_linear_probe(tmp_path):
    _separable_cache(tmp_path)
    cfg = _cfg(tmp_path)
    cfg.heads.heads = ("ridge", "logreg")
    cfg.heads.memory_budget = "1M"
    with pytest.raises(PipelineError) as e:
        heads.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "linear_probe" in msg and "ridge, logreg" in msg and "--memory-budget" in msg
    assert not (tmp_path / "artifacts" / "results").exists()  # refused before any work


def test_budget_parses_sizes_and_fractions(monkeypatch):
    from pipeline import resources

    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 2**30)
    assert budget.parse("8G") == 8 * 2**30 and budget.parse("512M") == 512 * 2**20
    assert budget.parse("0.5") == 4 * 2**30 and budget.parse(None) == int(0.75 * 8 * 2**30)
    with pytest.raises(PipelineError):
        budget.parse("lots")


def test_best_value_on_the_grid_edge_extends_the_grid_then_says_so(caplog):
    tried = []

    def rising(c):  # val accuracy that keeps improving with C: the optimum is beyond any grid
        tried.append(c)
        return float(np.log10(c))

    with caplog.at_level(logging.INFO):
        best, score, scores, _, _ = tuning.path_search(rising, object(), [1e-2, 1e-1, 1.0], "C")
    assert best == 100.0 and {10.0, 100.0} <= set(scores)  # two steps past the edge
    assert any("upper edge" in r.getMessage() and "C=100" in r.getMessage() for r in caplog.records)

    def peaked(c):
        tried.append(c)
        return -abs(np.log10(c) - np.log10(0.1))

    caplog.clear()
    best, *_ = tuning.path_search(peaked, object(), [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], "C")
    assert best == 0.1 and not any("edge" in r.getMessage() for r in caplog.records)


def test_coarse_pass_stops_past_the_peak():
    tried = []

    def peaked(c):
        tried.append(c)
        return -abs(np.log10(c) + 3)  # best at 1e-3

    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    best, *_ = tuning.path_search(peaked, object(), grid, "C")
    assert best == 1e-3 and 1e4 not in tried and 1e3 not in tried  # stopped two coarse values past the peak


def _blobs(n=600, d=12, seed=0, spread=1.5):
    """Three Gaussian classes; the centres are the same for every seed (train and val share them)."""
    centres = np.random.default_rng(99).normal(0, spread, (3, d))
    y = np.arange(n) % 3
    X = (centres[y] + np.random.default_rng(seed).normal(0, 1, (n, d))).astype(np.float32)
    return X, y


def test_ridge_head_equals_ridge_classifier():
    X, y = _blobs()
    for alpha in (0.1, 10.0, 1000.0):
        ours = RidgeHead(alpha).fit(X, y)
        ref = RidgeClassifier(alpha=alpha).fit(X.astype(np.float64), y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-3, atol=1e-4)


def test_kernel_svc_predicts_like_svc_rbf():
    X, y = _blobs(spread=0.5)
    Xq, _ = _blobs(seed=1, spread=0.5)
    for C in (0.1, 10.0):
        ours = KernelSVC(C=C).fit(X, y).predict(Xq)
        ref = SVC(kernel="rbf", gamma="scale", C=C).fit(X.astype(np.float64), y).predict(Xq.astype(np.float64))
        assert np.mean(ours == ref) > 0.99


@pytest.mark.parametrize("loss", ["log", "squared_hinge"])
def test_linear_head_tunes_every_c_at_once_and_keeps_the_best(loss):
    X, y = _blobs(n=900, spread=0.6)
    Xv, yv = _blobs(n=300, seed=2, spread=0.6)
    head = LinearHead(loss, epochs=15, batch_size=64)
    params, acc, _ = head.tune(X, y, Xv, yv, {"C": [1e-6, 1e-3, 1.0]})
    assert params["C"] in (1e-3, 1.0)  # C=1e-6 all but zeroes the weights
    assert acc == pytest.approx(np.mean(head.predict(Xv) == yv))  # the kept head is the one scored
    exact = (LogisticRegression if loss == "log" else LinearSVC)(C=params["C"], max_iter=5000).fit(X, y)
    assert acc > np.mean(exact.predict(Xv) == yv) - 0.02  # as good as scikit-learn's exact solver there
