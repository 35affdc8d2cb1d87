"""The learning curve: nested stratified subsets, one results row per (method, size), reruns replace."""

import numpy as np
import pandas as pd

from pipeline import curve, extract, results
from pipeline.cache.reader import load_features
from pipeline.data import nested_subset
from pipeline.report.curve import curve_points


def test_subsets_are_stratified_nested_and_keep_two_per_class():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    small, large = nested_subset(labels, 10, seed=3), nested_subset(labels, 50, seed=3)
    assert set(small) <= set(large)  # a larger point only adds images
    assert np.bincount(labels[small], minlength=3).tolist() == [9, 2, 1]  # >= 2 per class, as many as exist
    assert np.bincount(labels[large], minlength=3).tolist() == [45, 5, 1]
    assert len(nested_subset(labels, 100, seed=3)) == 100


def test_curve_writes_one_row_per_method_and_size_and_a_rerun_replaces_them(cfg, caplog, monkeypatch):
    extract.run(cfg)
    reads = []
    monkeypatch.setattr(curve, "load_features", lambda *a: reads.append(1) or load_features(*a))
    cfg.heads.heads = ("ridge", "logreg")
    cfg.heads.layers = ("last",)
    cfg.heads.features = ("image",)
    cfg.curve.fractions = (0.5, 1.0)
    cfg.finetune.epochs_head = cfg.finetune.epochs_finetune = 1
    cfg.finetune.batch_size = 6
    points = curve.run(cfg)
    assert points == [9, 18]  # 18 training images (6 per class): half is 3 per class
    assert len(reads) == 1  # the cache is read once for all points
    path = results.results_path(cfg.artifacts, "toy")
    table = results.read_results(path)
    got = sorted(zip(table["method"], table["n_train"]))
    expected = [(m, n) for m in ("finetune", "frozen_dense", "logreg", "ridge") for n in (9, 18)]
    assert got == expected
    assert (table.loc[table["n_train"] == 9, "predictions"].str.contains("-n9")).all()
    pts = curve_points(table)
    assert set(pts["label"]) == {"finetune", "frozen_dense", "logreg", "ridge"}
    assert (pts["acc_ci_low"] <= pts["test_accuracy"]).all()

    caplog.clear()
    curve.run(cfg)  # nothing changed: every point reused
    assert caplog.text.count("up to date") == 4 and len(reads) == 1  # nothing to fit: the cache is not read
    cfg.force = True
    curve.run(cfg)
    again = results.read_results(path)
    assert len(again) == len(table)  # replaced, not duplicated
    assert (pd.to_datetime(again["timestamp"]) >= pd.to_datetime(table["timestamp"]).max()).all()
