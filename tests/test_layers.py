"""Heads reading taps (--layers), the auto layer search, the mlp and knn heads, augmented views.

The constructed cache: the final embedding and the tap ``noise`` carry no class
signal; the tap ``signal`` separates the classes. ``auto`` must find it.
"""

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from conftest import TINY

from pipeline import heads, results
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache.reader import load_features
from pipeline.extract.cache.writer import write_cache
from pipeline.heads import layer_select

N = {"train": 150, "val": 60, "test": 90}
CLASSES = ["a", "b", "c"]

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def _tapped_cache(root, views=0, seed=0):
    rng = np.random.default_rng(seed)
    path = root / "artifacts" / "features" / "synth" / "fake_net.h5"
    path.parent.mkdir(parents=True)
    centres = rng.normal(0, 1, (3, 6))
    splits = {}
    groups = dict(N, **({"views": N["train"] * views} if views else {}))
    for s, n in groups.items():
        y = np.arange(n) % 3
        emb = rng.normal(0, 1, (n, 20)).astype(np.float32)
        names = [f"{'train' if s == 'views' else s}/{CLASSES[c]}/{i % N['train']:04d}.png" for i, c in enumerate(y)]
        noise = rng.normal(0, 1, (n, 5)).astype(np.float32)
        signal = (1.5 * centres[y] + rng.normal(0, 1, (n, 6))).astype(np.float32)
        splits[s] = {"embeddings": emb, "labels": y, "ids": names, "taps": {"noise": noise, "signal": signal}}
    attrs = {"backbone": "fake_net", "class_names": json.dumps(CLASSES), "extract_seconds": 3.0}
    write_cache(path, attrs, splits)
    (root / "data" / "synth").mkdir(parents=True)
    return path


@pytest.fixture
def tapped(tmp_path):
    _tapped_cache(tmp_path)
    cfg = Config()
    cfg.artifacts = str(tmp_path / "artifacts")
    cfg.data.dataset = str(tmp_path / "data" / "synth")
    cfg.backbone.backbone = "fake_net"
    cfg.heads.c_grid = (0.01, 0.1, 1.0)
    cfg.heads.n_jobs = 1
    cfg.heads.heads = ("logreg",)
    return cfg


def test_auto_finds_the_tap_that_carries_the_signal(tapped):
    tapped.heads.layers = ("last", "auto")
    out = heads.run(tapped)
    by = {r.layers: r for r in out}
    assert by["auto"].layer_names == ["signal"] or "signal" in by["auto"].layer_names
    assert "noise" not in by["auto"].layer_names
    assert by["last"].scores["test_accuracy"] < 0.5 < 0.8 < by["auto"].scores["test_accuracy"]
    table = results.read_results(results.results_path(tapped.artifacts, "synth"))
    assert sorted(table["layers"]) == ["auto", "last"]  # part of the row key: two rows, not one replaced
    assert json.loads(table.set_index("layers").loc["auto", "params"])["layers"] == by["auto"].layer_names
    sel = json.loads((Path(tapped.artifacts) / "heads" / "synth" / "fake_net" / "layers.json").read_text())
    scores = {r["layer"]: r["val_accuracy"] for r in sel["per_layer"]}
    assert scores["signal"] > 0.8 and scores["last"] < 0.5 and scores["noise"] < 0.5
    assert set(scores) == {"last", "noise", "signal"} and {"test_accuracy", "width"} <= set(sel["per_layer"][0])


def test_all_and_named_layer_sets_each_get_a_row_and_an_artifact(tapped):
    tapped.heads.layers = ("all", "signal", "last")
    heads.run(tapped)
    table = results.read_results(results.results_path(tapped.artifacts, "synth"))
    assert sorted(table["layers"]) == ["all", "last", "signal"]
    d = Path(tapped.artifacts) / "heads" / "synth" / "fake_net"
    assert (d / "logreg@all.joblib").exists() and (d / "logreg.joblib").exists()
    fs = load_features(extract.cache_path(tapped)).with_layers(["last", "noise", "signal"])
    model = joblib.load(d / "logreg@all.joblib")
    pred = pd.read_csv(d / "logreg@all.predictions.csv")["y_pred"].to_numpy()
    assert (model.predict(fs.splits["test"].X) == pred).all()


def test_unknown_layer_names_are_one_line(tapped):
    tapped.heads.layers = ("signal", "block7")
    with pytest.raises(PipelineError, match="the cache has no layer\\(s\\) block7 \\(has: last, noise, signal\\)"):
        heads.run(tapped)


def test_variants_parse_keywords_and_names():
    got = layer_select.variants(("last", "auto", "a", "b", "all", "last"), ["last", "a", "b"])
    assert got == [("last", ["last"]), ("auto", None), ("all", ["last", "a", "b"]), ("a,b", ["a", "b"])]
    assert layer_select.variants(("tap2", "a"), ["last", "a", "b"]) == [("b,a", ["b", "a"])]


def test_mlp_and_knn_heads_are_tuned_saved_and_recorded(tapped):
    tapped.heads.heads = ("mlp", "knn")
    tapped.heads.layers = ("signal",)
    tapped.heads.k_grid = (1, 5, 25)
    tapped.heads.mlp_hidden = 32
    tapped.heads.mlp_dropout = (0.5,)
    out = {r.head: r for r in heads.run(tapped)}
    assert out["knn"].params["n_neighbors"] in (1, 5, 25) and out["mlp"].params["epochs"] >= 1
    for r in out.values():
        assert r.scores["test_accuracy"] > 0.75 and r.val_accuracy > 0.75
    table = results.read_results(results.results_path(tapped.artifacts, "synth"))
    assert sorted(table["method"]) == ["knn", "mlp"] and (table["train_seconds"] > 0).all()
    d = Path(tapped.artifacts) / "heads" / "synth" / "fake_net"
    name = results.head_name("mlp", "image", "signal")
    model = joblib.load(d / f"{name}.joblib")  # the Keras MLP round-trips through joblib
    fs = load_features(extract.cache_path(tapped)).with_layers(["signal"])
    pred = pd.read_csv(d / f"{name}.predictions.csv")["y_pred"].to_numpy()
    assert (model.predict(fs.splits["test"].X) == pred).all()


def test_knn_tuning_scores_every_k_from_one_search():
    from pipeline.estimators.knn import CosineKNN

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (200, 4))
    y = (X[:, 0] > 0).astype(int)
    knn = CosineKNN()
    params, acc, _ = knn.tune(X[:150], y[:150], X[150:], y[150:], {"n_neighbors": [1, 7, 149]})
    ref = {k: float(np.mean(CosineKNN(k).fit(X[:150], y[:150]).predict(X[150:]) == y[150:])) for k in (1, 7, 149)}
    assert acc == max(ref.values()) and ref[params["n_neighbors"]] == acc


def test_train_views_add_rows_and_a_view_count_mismatch_is_clear(tmp_path):
    _tapped_cache(tmp_path, views=2)
    fs = load_features(tmp_path / "artifacts" / "features" / "synth" / "fake_net.h5")
    assert fs.n_views == 2
    one = fs.with_layers(["signal"], train_views=1)
    assert one.splits["train"].X.shape == (2 * N["train"], 6) and one.splits["test"].X.shape == (N["test"], 6)
    assert len(fs.with_layers(["last"], train_views=2).splits["train"].y) == 3 * N["train"]
    with pytest.raises(PipelineError, match="--train-views 3 but fake_net.h5 holds 2 augmented views.*--views 3"):
        fs.with_layers(["last"], train_views=3)


def test_extract_views_caches_augmented_training_views(cfg):
    cfg.extract.views = 2
    res = extract.run(cfg)
    fs = load_features(res.path)
    assert fs.n_views == 2 and fs.views["last"].shape == (2 * 18, 16) and fs.views["bn1"].shape[1] == 8
    assert list(fs.views["ids"][:18]) == list(fs.splits["train"].ids)
    assert not np.allclose(fs.views["last"][:18], fs.splits["train"].X)  # augmented, not copies
    assert fs.splits["val"].X.shape == (9, 16)  # val and test never augmented
    cfg.extract.views = 1
    assert not extract.run(cfg).cache_hit  # the view count is part of the key
    assert TINY in fs.backbone


def test_views_resume_after_the_splits_are_done(cfg, monkeypatch):
    cfg.extract.views = 1
    real = extract._write_pass

    def killed_in_views(writer, root, sources, *a, **k):
        if "views" in sources:
            raise KeyboardInterrupt
        return real(writer, root, sources, *a, **k)

    monkeypatch.setattr(extract, "_write_pass", killed_in_views)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    monkeypatch.setattr(extract, "_write_pass", real)
    res = extract.run(cfg)  # splits already complete: only the views pass runs
    fs = load_features(res.path)
    assert fs.n_views == 1 and len(fs.views["ids"]) == 18 and len(fs.splits["train"].ids) == 18


def test_layers_read_as_taps_with_their_shape_and_tapk_names_the_same_set_as_the_keras_name(cfg):
    """The tiny backbone's one stage tap: labelled with its block-less name, channels and resolution in the
    cache, the log and layers.json; ``--layers tap1`` is the same set (same artifact, same row) as its raw
    Keras name, which --layers still takes."""
    extract.run(cfg)
    fs = load_features(extract.cache_path(cfg))
    raw = fs.layer_names()[1]
    labels = fs.layer_labels()
    assert labels["last"] == "final embedding" and labels[raw] == f"tap 1: {raw} (8 ch, 7×7)"
    assert layer_select.variants(("tap1",), fs.layer_names()) == [(raw, [raw])]
    assert layer_select.variants((raw,), fs.layer_names()) == [(raw, [raw])]
    from pipeline.extract.cache.reader import tap_label

    assert tap_label(4, "_blocks__11___bn0__relu6", [7, 7, 672]) == "tap 4: block 11 (672 ch, 7×7)"
    cfg.heads.heads, cfg.heads.layers = ("ridge",), ("tap1", "auto")
    heads.run(cfg)
    sel = json.loads((Path(cfg.artifacts) / "heads" / "toy" / f"{TINY}@16px" / "layers.json").read_text())
    assert {r["label"] for r in sel["per_layer"]} == {"final embedding", labels[raw]}
    table = results.read_results(results.results_path(cfg.artifacts, "toy"))
    assert raw in set(table["layers"])  # keyed by the raw name: `--layers <raw name>` finds this row again
