"""Heads on a synthetic cache whose metadata is informative by construction.

The embeddings carry a weak class signal buried in noise; the metadata column
``hint`` equals the label for 85% of images (so it is informative but not the
label itself), and ``shuffled`` is the same column permuted across images, which
carries no information about any particular image.
"""

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from pipeline import heads, results
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache.reader import load_features
from pipeline.extract.cache.writer import write_cache
from pipeline.heads.features import fuse, metadata_table

N = {"train": 240, "val": 90, "test": 150}
CLASSES = ["a", "b", "c"]


def _fake_cache(root, backbone="fake_net", dim=24, seed=0):
    """A complete cache in extract's layout, plus data/<name>/metadata.csv."""
    rng = np.random.default_rng(seed)
    path = root / "artifacts" / "features" / "synth" / f"{backbone}.h5"
    path.parent.mkdir(parents=True)
    rows = []
    centres = rng.normal(0, 1, (3, dim))
    splits = {}
    for s, n in N.items():
        y = np.arange(n) % 3
        X = 0.25 * centres[y] + rng.normal(0, 1, (n, dim))
        ids = [f"{s}/{CLASSES[c]}/{s}_{i:04d}.png" for i, c in enumerate(y)]
        splits[s] = {"embeddings": X.astype(np.float32), "labels": y, "ids": ids}
        hint = np.where(rng.random(n) < 0.85, y, rng.integers(0, 3, n))
        rows += [
            {"image_id": i.split("/")[-1], "hint": int(h), "site": ["x", "y"][k % 2]}
            for k, (i, h) in enumerate(zip(ids, hint))
        ]
    attrs = {
        "backbone": backbone,
        "class_names": json.dumps(CLASSES),
        "extract_seconds": 12.5,
        "weights": "random (none) - for tests only, not pretrained",
    }
    write_cache(path, attrs, splits)
    meta = pd.DataFrame(rows)
    meta["shuffled"] = rng.permutation(meta["hint"].to_numpy())
    data = root / "data" / "synth"
    data.mkdir(parents=True)
    meta.sample(frac=1, random_state=1).to_csv(data / "metadata.csv", index=False)  # row order is irrelevant
    return path, data


@pytest.fixture
def synth(tmp_path):
    path, data = _fake_cache(tmp_path)
    cfg = Config()
    cfg.artifacts = str(tmp_path / "artifacts")
    cfg.data.dataset = str(data)
    cfg.backbone.backbone = "fake_net"
    cfg.heads.c_grid = (0.01, 0.1, 1.0)
    cfg.heads.meta_weights = (1.0, 4.0)
    cfg.heads.n_jobs = 1
    cfg.heads.heads = ("linear_svm", "rbf_svm", "logreg")
    cfg.heads.layers = ("last",)
    return cfg


def _test_acc(cfg, head, features, columns):
    cfg.heads.meta_columns = columns
    fs = load_features(extract.cache_path(cfg))
    splits = fs.splits if features == "image" else fuse(fs, metadata_table(cfg.metadata_path, fs, columns))[0]
    return heads.fit_head(head, features, splits, fs.embedding_dim, cfg.heads, cfg.data.seed)[1].scores["test_accuracy"]


@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
def test_informative_metadata_beats_image_only_and_shuffled_does_not(synth, head):
    image = _test_acc(synth, head, "image", ())
    fused = _test_acc(synth, head, "image+meta", ("hint",))
    fused_norm = _test_acc(synth, head, "image+meta_norm", ("hint",))
    shuffled = _test_acc(synth, head, "image+meta_norm", ("shuffled",))
    assert image < 0.75  # the embedding alone is weak by construction
    assert fused > image + 0.1 and fused_norm > image + 0.1
    assert shuffled < image + 0.05


def test_run_writes_heads_sidecars_predictions_and_one_row_per_config(synth, capsys):
    synth.heads.meta_columns = ("hint", "site")
    out = heads.run(synth)
    assert len(out) == 9  # 3 heads x (image, image+meta, image+meta_norm)
    table = results.read_results(results.results_path(synth.artifacts, "synth"))
    assert len(table) == 9
    assert set(table["method"]) == {"linear_svm", "rbf_svm", "logreg"}
    assert set(table["features"]) == {"image", "image+meta", "image+meta_norm"}
    assert (table["extract_seconds"] == 12.5).all()
    # the cost charged is tuning + the kept model's fit, each measured (a fit always takes time)
    assert np.allclose(table["train_seconds"], table["tune_seconds"] + table["fit_seconds"])
    assert (table["fit_seconds"] > 0).all() and (table["tune_seconds"] >= 0).all()
    assert (table["n_test"] == 150).all() and table["test_accuracy"].between(0, 1).all()
    assert {"test_balanced_accuracy", "test_macro_f1"} <= set(table.columns)
    # the grid, or up to two steps beyond its edge when the best C sat on it
    assert all(json.loads(p)["C"] in (1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0) for p in table["params"])
    d = Path(synth.artifacts) / "heads" / "synth" / "fake_net"
    side = json.loads((d / "logreg+meta_norm.json").read_text())
    assert side["params"]["meta_weight"] in (1.0, 4.0) and side["metadata_columns"] == ["hint", "site=x", "site=y"]
    assert "scikit-learn" in side["versions"] and side["config"]["heads"]["c_grid"] == [0.01, 0.1, 1.0]
    model = joblib.load(d / "logreg.joblib")
    fs = load_features(extract.cache_path(synth))
    pred = pd.read_csv(d / "logreg.predictions.csv")
    assert (model.predict(fs.splits["test"].X) == pred["y_pred"].to_numpy()).all()
    assert "logreg" in capsys.readouterr().out

    synth.heads.heads = ("logreg",)
    heads.run(synth)
    again = results.read_results(results.results_path(synth.artifacts, "synth"))
    assert len(again) == 9  # replaced, not duplicated


def test_missing_metadata_rows_error_by_name_or_follow_the_policy(synth):
    meta_path = synth.metadata_path
    meta = pd.read_csv(meta_path)
    gone = meta["image_id"].isin(["test_0007.png", "train_0003.png"])
    meta[~gone].to_csv(meta_path, index=False)
    fs = load_features(extract.cache_path(synth))
    table = metadata_table(meta_path, fs, ("hint",))
    with pytest.raises(PipelineError, match=r"1 train images have no metadata row, e\.g\. train/a/train_0003\.png"):
        fuse(fs, table)
    dropped, _ = fuse(fs, table, "drop")
    assert len(dropped["train"].y) == N["train"] - 1 and len(dropped["test"].y) == N["test"] - 1
    assert "test/b/test_0007.png" not in set(dropped["test"].ids)
    imputed, _ = fuse(fs, table, "impute")
    row = list(imputed["test"].ids).index("test/b/test_0007.png")
    assert imputed["test"].X[row, -1] == np.median(table.reindex(fs.splits["train"].ids)["hint"].dropna())


def test_label_never_enters_the_metadata(synth):
    meta = pd.read_csv(synth.metadata_path)
    fs = load_features(extract.cache_path(synth))
    labels = {i.split("/")[-1]: i.split("/")[1] for s in fs.splits.values() for i in s.ids}
    meta["label"] = meta["image_id"].map(labels)
    meta["coded"] = meta["label"].map({"a": 10, "b": 20, "c": 30})  # the label under another name
    meta.to_csv(synth.metadata_path, index=False)
    assert set(metadata_table(synth.metadata_path, fs).columns) == {"hint", "site", "shuffled"}
    with pytest.raises(PipelineError, match="coded encode the class label"):
        metadata_table(synth.metadata_path, fs, ("hint", "coded"))


def test_cache_of_another_backbone_or_missing_cache_is_refused(synth, tmp_path):
    path = extract.cache_path(synth)
    with pytest.raises(PipelineError, match="made by backbone fake_net, not resnet50"):
        load_features(path, "resnet50")
    synth.backbone.backbone = "mobilenet_v2"
    with pytest.raises(PipelineError, match="no embedding cache .*run `make extract`"):
        heads.run(synth)


def test_rbf_svm_subsamples_large_training_sets_with_a_notice(synth, caplog):
    synth.heads.rbf_max_train = 60
    fs = load_features(extract.cache_path(synth))
    _, r = heads.fit_head("rbf_svm", "image", fs.splits, fs.embedding_dim, synth.heads, synth.data.seed)
    assert r.n_train == 60 and "subsample of 60 of 240" in caplog.text


def test_cli_heads_parses_list_options_and_prints_the_table(synth, capsys):
    from pipeline.cli import main

    argv = [
        "heads",
        "--dataset",
        synth.data.dataset,
        "--artifacts",
        synth.artifacts,
        "--backbone",
        "fake_net",
        "--heads",
        "logreg",
        "--features",
        "image",
        "--layers",
        "last",
        "--c-grid",
        "0.01",
        "1",
        "--n-jobs",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "logreg" in out and "image" in out
    table = results.read_results(results.results_path(synth.artifacts, "synth"))
    assert list(table["method"]) == ["logreg"]
    assert json.loads(table["params"][0])["C"] in (1e-6, 1e-4, 0.01, 1.0, 100.0, 1e4)  # grid, or past its edge


def test_cli_heads_bad_choice_is_rejected(synth):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["heads", "--dataset", synth.data.dataset, "--metadata-missing", "never"])
    assert e.value.code == 2


def test_unchanged_inputs_reuse_every_head_and_a_changed_setting_refits_only_its_heads(synth, monkeypatch, caplog):
    synth.heads.heads = ("ridge", "logreg")
    synth.heads.features = ("image", "image+meta")
    synth.heads.meta_columns = ("hint",)
    heads.run(synth)
    before = results.read_results(results.results_path(synth.artifacts, "synth"))
    calls = []
    real = heads.fit_head

    def spy(head, features, *a, **k):
        calls.append((head, features))
        return real(head, features, *a, **k)

    monkeypatch.setattr(heads.stage, "fit_head", spy)
    monkeypatch.setattr(
        heads.stage, "load_features", lambda *a, **k: pytest.fail("loaded the cache with nothing to fit")
    )
    out = heads.run(synth)
    assert calls == [] and len(out) == 4 and "up to date" in caplog.text
    pd.testing.assert_frame_equal(before, results.read_results(results.results_path(synth.artifacts, "synth")))

    monkeypatch.undo()
    monkeypatch.setattr(heads.stage, "fit_head", spy)
    synth.heads.c_grid = (0.1, 1.0)  # logreg's grid: ridge is unaffected
    heads.run(synth)
    assert calls == [("logreg", "image"), ("logreg", "image+meta")]
    meta = synth.metadata_path
    meta.write_text(meta.read_text().replace(",x,", ",z,"))  # the metadata changed: only the meta heads refit
    calls.clear()
    heads.run(synth)
    assert calls == [("ridge", "image+meta"), ("logreg", "image+meta")]
    calls.clear()
    synth.force = True
    heads.run(synth)
    assert len(calls) == 4
