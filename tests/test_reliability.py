"""Faults and races tried on purpose: concurrent writers, edited tables, full disks, signals, corrupt caches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from pipeline import results
from pipeline.errors import PipelineError

_UPSERTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline import results
    path, who, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    for i in range(200):
        results.upsert(path, {"dataset": "d", "backbone": who, "method": "ridge", "features": "image",
                              "n_train": i, "test_accuracy": 0.5})
    """
)


def test_concurrent_upserts_lose_no_row(tmp_path):
    """Two processes adding 200 distinct rows each to one table at the same time: all 400 are there."""
    path, go = tmp_path / "results" / "d.csv", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _UPSERTER, str(path), who, str(go)], stderr=subprocess.PIPE)
        for who in ("a", "b")
    ]
    time.sleep(1.0)  # both interpreters up and waiting
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    table = results.read_results(path)
    assert len(table) == 400
    assert sorted(table.groupby("backbone").size().tolist()) == [200, 200]
    assert not list(path.parent.glob("*.tmp*"))


def test_invalid_results_table_is_named_with_its_line(tmp_path):
    path = tmp_path / "d.csv"
    results.upsert(path, {"dataset": "d", "backbone": "b", "method": "ridge", "features": "image", "n_train": 1})
    results.upsert(path, {"dataset": "d", "backbone": "b", "method": "logreg", "features": "image", "n_train": 1})
    lines = path.read_text().splitlines()
    lines[2] += ",one,field,too,many"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(PipelineError, match=r"d\.csv is not a valid results table: .*line 3"):
        results.upsert(path, {"dataset": "d", "backbone": "b", "method": "knn", "features": "image", "n_train": 1})
    assert path.read_bytes() == before  # named, never rewritten


def test_results_row_without_key_is_named(tmp_path):
    path = tmp_path / "d.csv"
    row = {"dataset": "d", "backbone": "b", "method": "ridge", "features": "image", "n_train": 1}
    pd.DataFrame([row, {**row, "method": None}]).to_csv(path, index=False)
    with pytest.raises(PipelineError, match="line 3 has no dataset/backbone/method"):
        results.read_results(path)


def _head_outputs(cfg, fs, order):
    """Every default head on layer sets last and all, in ``order``: (val accuracy, val and test predictions)."""
    import joblib

    from pipeline import heads

    cfg.heads.heads = tuple(order)
    out = {}
    for r in heads.run(cfg, load=lambda: fs):
        name = results.head_name(r.head, r.features, r.layers)
        model = joblib.load(heads.Path(cfg.artifacts) / "heads" / "toy" / "tiny_cnn" / f"{name}.joblib")
        val = fs.with_layers(r.layer_names).splits["val"].X
        out[name] = (r.val_accuracy, model.predict(val).tolist(), r.test_pred.tolist())
    return out


def test_heads_leave_the_shared_arrays_bit_identical_and_do_not_depend_on_their_order(cfg, tmp_path):
    """The scalers used to be applied to the shared float32 arrays and undone after (not the identity)."""
    import shutil

    from pipeline import extract
    from pipeline.config import HeadsConfig
    from pipeline.features import load_features

    cfg.heads.layers = ("last", "all")
    path = extract.run(cfg).path
    fs = load_features(path)
    before = {s: a.copy() for s, a in fs.packed.items()}
    forward = _head_outputs(cfg, fs, HeadsConfig().heads)
    for s, a in fs.packed.items():
        assert np.array_equal(a, before[s]), f"{s} features changed by fitting the heads"
    second = tmp_path / "second"
    shutil.copytree(path.parent, second / "features" / "toy")
    cfg.artifacts = str(second)
    backward = _head_outputs(cfg, load_features(path), reversed(HeadsConfig().heads))
    assert len(forward) == 8 and forward == backward


def test_augmentation_layers_draw_from_independent_seeds():
    from pipeline.finetune import augmentation_layers

    layers = augmentation_layers(("flip", "zoom", "translate"), 0)
    seeds = [layer.seed for layer in layers]
    assert len(set(seeds)) == 3
    assert seeds == [layer.seed for layer in augmentation_layers(("flip", "zoom", "translate"), 0)]
    assert seeds != [layer.seed for layer in augmentation_layers(("flip", "zoom", "translate"), 1)]


def test_a_cache_of_another_precision_is_reextracted_with_the_reason(cfg, caplog):
    import h5py

    from pipeline import extract

    first = extract.run(cfg)
    with h5py.File(first.path, "r") as f:
        assert f.attrs["precision"] == "float32 (CPU)"
    with h5py.File(first.path, "a") as f:  # as a GPU run under mixed precision would have written it
        f.attrs["precision"] = "mixed_float16 (GPU)"
        f.attrs["device"] = "GPU"
    second = extract.run(cfg)
    assert not second.cache_hit
    assert "precision changed: mixed_float16 (GPU) -> float32 (CPU)" in caplog.text
    with h5py.File(second.path, "a") as f:  # a cache from before precision was keyed: its device settles it
        del f.attrs["precision"]
    assert extract.run(cfg).cache_hit
