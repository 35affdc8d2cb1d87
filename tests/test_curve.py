"""The learning curve: nested stratified subsets, one results row per (method, size), reruns replace."""

import numpy as np
import pandas as pd
import pytest

from pipeline import curve, results
from pipeline.data import nested_subset
from pipeline.extract import stage as extract
from pipeline.extract.cache.reader import load_features
from pipeline.heads import stage as head_stage
from pipeline.report.curve import curve_points

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


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
    monkeypatch.setattr(head_stage, "load_features", lambda *a: reads.append(1) or load_features(*a))
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


def test_an_interrupted_curve_point_resumes_where_it_stopped(cfg, caplog, monkeypatch):
    """Killed in the fine-tune's phase 2 at the second point: the rerun reuses the first point and the heads of
    the second, and the fine-tune continues after its finished phase 1 instead of starting over."""
    from pipeline import finetune

    extract.run(cfg)
    cfg.heads.heads, cfg.heads.layers, cfg.heads.features = ("ridge",), ("last",), ("image",)
    cfg.curve.fractions = (0.5, 1.0)
    cfg.curve.finetune_fractions = (0.5, 1.0)
    cfg.finetune.epochs_head = cfg.finetune.epochs_finetune = 1
    cfg.finetune.batch_size = 6
    cfg.finetune.lr_grid = (1e-3,)
    real, phases, killed = finetune.phases.fit_phase, [], []

    def killed_in_phase_two_of_the_full_size(model, phase, epochs, train, val, c, work, **kw):
        phases.append((work.name, phase))
        if phase == 2 and "-n" not in work.name and not killed:
            killed.append(work.name)
            raise KeyboardInterrupt
        return real(model, phase, epochs, train, val, c, work, **kw)

    monkeypatch.setattr(finetune.phases, "fit_phase", killed_in_phase_two_of_the_full_size)
    with pytest.raises(KeyboardInterrupt):
        curve.run(cfg)
    assert killed == ["tiny_cnn-finetuned.work"], "the planted interruption did not happen"
    caplog.clear()
    phases.clear()
    assert curve.run(cfg) == [9, 18]
    assert phases == [("tiny_cnn-finetuned.work", 2)]  # only the unfinished phase trained again
    assert "phase 1 already done (resumed" in caplog.text and caplog.text.count("up to date") == 2  # the heads
    table = results.read_results(results.results_path(cfg.artifacts, "toy"))
    assert sorted(zip(table["method"], table["n_train"])) == [
        (m, n) for m in ("finetune", "frozen_dense", "ridge") for n in (9, 18)
    ]
