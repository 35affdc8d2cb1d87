"""Use the answer: predict on new images and export one self-contained model (tiny backbone, generated images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_of, toy_config, toy_presplit
from PIL import Image

from pipeline import heads, report
from pipeline.apply import export, methods, predict
from pipeline.data import image_dataset
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache.reader import load_features

ROOT = Path(__file__).parent.parent
LINEAR = ["ridge@all", "logreg@all", "linear_svm@all"]
WITHOUT_PIPELINE = str(Path(__file__).parent / "without_pipeline.py")

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


@pytest.fixture(scope="module")
def _fitted_once(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fitted")
    toy_presplit(base)
    cfg = toy_config(base)
    extract.run(cfg)
    heads.run(cfg)
    report.run(cfg)
    return base


@pytest.fixture
def fitted(_fitted_once, tmp_path):
    """Cache, the default heads on last and all, and a report (which records the verdict's choice): built
    once for the module, each test given its own copy."""
    return copy_of(_fitted_once, tmp_path)


def _test_images(cfg, fs, ids=None):
    ids = list(fs.splits["test"].ids) if ids is None else ids
    paths = [str(cfg.dataset_dir / i) for i in ids]
    return np.concatenate([b.numpy() for b, _ in image_dataset(paths, 16, 32)])


def _sklearn_scores(method, X):
    head = method.head
    ref = head.predict_proba(X) if hasattr(head, "predict_proba") else head.decision_function(X)
    return ref[:, None] if ref.ndim == 1 else ref


def test_predict_with_the_recorded_choice_reproduces_the_test_predictions(fitted, tmp_path, capsys):
    choice = json.loads(methods.choice_path(fitted.artifacts, "toy").read_text())
    fitted.predict.images = str(fitted.dataset_dir / "test")
    out = predict.run(fitted)
    got = pd.read_csv(out)
    heads_dir = Path(fitted.artifacts) / "heads" / "toy" / "tiny_cnn@16px"
    saved = pd.read_csv(heads_dir / f"{choice['name']}.predictions.csv")
    saved["id"] = saved["id"].str.removeprefix("test/")
    merged = got.merge(saved, on="id")
    assert len(merged) == len(saved) == 9 and (merged["predicted"] == merged["pred"]).all()
    assert (got["method"] == choice["name"]).all() and (got["status"] == "ok").all()
    assert f"accuracy {choice['test_accuracy']:.4f}" in capsys.readouterr().out
    score_cols = [c for c in got.columns if c.startswith(("p_", "score_"))]
    # which head wins a tie on this tiny data depends on the timings; libsvm's RBF SVM has votes, no scores
    classes = [] if methods.load(fitted, choice["name"]).score_kind is None else ["blue", "green", "red"]
    assert [c.split("_", 1)[1] for c in score_cols] == classes


def test_an_unreadable_image_is_listed_not_dropped(fitted, tmp_path, caplog):
    folder = tmp_path / "new"
    folder.mkdir()
    for i, src in enumerate(sorted((fitted.dataset_dir / "test" / "red").glob("*.png"))[:2]):
        (folder / f"img{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    fitted.predict.images = str(folder)
    fitted.predict.method = "ridge"
    got = pd.read_csv(predict.run(fitted)).set_index("id")
    assert sorted(got.index) == ["broken.png", "img0.png", "img1.png"]  # every image has its row
    assert got.loc["broken.png", "status"] == "unreadable" and pd.isna(got.loc["broken.png", "predicted"])
    assert (got.loc[["img0.png", "img1.png"], "predicted"] == "red").all()
    assert "1 unreadable image(s), listed in the output: broken.png" in caplog.text


def test_missing_or_stale_artifacts_are_one_line_errors_naming_the_command(fitted, tmp_path):
    fitted.predict.images = str(fitted.dataset_dir / "test")
    fitted.predict.method = "knn@all"
    with pytest.raises(PipelineError, match=r"no method 'knn@all' for tiny_cnn@16px on toy: run `make svm`"):
        predict.run(fitted)
    fitted.predict.method = "finetune"
    with pytest.raises(PipelineError, match=r"no finetune model for tiny_cnn on toy .*: run `make finetune`"):
        predict.run(fitted)
    fitted.predict.method = "ridge"
    img = next((fitted.dataset_dir / "train").rglob("*.png"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touched image: the same variant re-extracted
    extract.run(fitted)
    with pytest.raises(PipelineError, match=r"ridge was fitted on features the cache no longer holds.*`make svm`"):
        predict.run(fitted)
    methods.choice_path(fitted.artifacts, "toy").unlink()
    fitted.predict.method = None
    with pytest.raises(PipelineError, match=r"no recorded choice for toy .*run `make report` first"):
        predict.run(fitted)


@pytest.mark.parametrize("name", LINEAR)
def test_a_folded_linear_head_equals_the_scikit_learn_head(fitted, name):
    """Standardisation, block weights and the linear weights are one Dense layer: same scores, no sklearn."""
    fitted.export.method = name
    out = export.run(fitted)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["self_contained"] and manifest["method"] == name
    import keras

    model = keras.models.load_model(out / "model.keras")
    assert {type(layer).__module__.split(".")[0] for layer in _all_layers(model)} == {"keras"}
    method = methods.load(fitted, name)
    fs = load_features(extract.cache_path(fitted))
    X = fs.with_layers(method.record["layer_names"]).splits["test"].X
    got = np.asarray(model(_test_images(fitted, fs)))
    np.testing.assert_allclose(got, _sklearn_scores(method, X), atol=1e-5)
    assert (out / "labels.txt").read_text().split() == [c.split("_", 1)[1] for c in method.score_columns()]


def _all_layers(model):
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


@pytest.mark.parametrize("fmt", ["onnx", "litert", "saved_model", "keras"])
def test_exported_files_run_without_this_package_on_images_as_decoded(fitted, tmp_path, fmt):
    """Each format loaded by TensorFlow / ONNX Runtime / LiteRT alone, in a process where `import pipeline`
    fails, fed each test image as PIL decodes it (20 px; the model resizes to 16 inside): the predicted
    classes of the head's predictions.csv and its scores within 1e-5; a stack of images already at the
    input size gives the same."""
    fitted.export.method, fitted.export.format = "logreg@all", fmt
    out = export.run(fitted)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [None, None, None, 3] and len(manifest["usage"]) >= 3
    fs = load_features(extract.cache_path(fitted))
    saved = pd.read_csv(Path(fitted.artifacts) / "heads" / "toy" / "tiny_cnn@16px" / "logreg@all.predictions.csv")
    files = [str(fitted.dataset_dir / i) for i in saved["id"]]
    assert all(Image.open(f).size == (20, 20) for f in files)
    np.save(tmp_path / "images.npy", _test_images(fitted, fs, list(saved["id"])))
    method = methods.load(fitted, "logreg@all")
    X = fs.with_layers(method.record["layer_names"]).splits["test"].X
    order = [list(fs.splits["test"].ids).index(i) for i in saved["id"]]
    source = [*files, str(tmp_path / "images.npy")]  # the files one by one, then the same images as one stack
    run = subprocess.run(
        [sys.executable, WITHOUT_PIPELINE, str(ROOT / "examples" / "load_exported.py"), str(out), *source]
        + ["--scores", str(tmp_path / "scores.npy")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == saved["pred"].tolist() * 2
    expected = _sklearn_scores(method, X[order])
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), np.vstack([expected, expected]), atol=1e-5)


def test_an_rbf_head_exports_as_features_plus_head_and_refuses_onnx_in_one_line(fitted):
    fitted.export.method = "rbf_svm@all"
    out = export.run(fitted)
    assert (out / "model.keras").exists() and (out / "head.joblib").exists()
    assert not json.loads((out / "manifest.json").read_text())["self_contained"]
    fitted.export.format = "onnx"
    with pytest.raises(PipelineError, match="does not fold into a network layer, so it has no onnx form"):
        export.run(fitted)


def _with_metadata(cfg):
    """A metadata table for every image: 'site' (categorical, one value only in test) and 'score' (numeric)."""
    rows = []
    for p in sorted(cfg.dataset_dir.rglob("*.png")):
        rel = p.relative_to(cfg.dataset_dir).as_posix()
        site = "unseen" if rel.startswith("test/") and rel.endswith("0.png") else ["a", "b"][len(rows) % 2]
        rows.append({"image_id": rel, "site": site, "score": float(len(rows) % 5)})
    meta = pd.DataFrame(rows)
    meta.to_csv(cfg.dataset_dir / "metadata.csv", index=False)
    return meta


def test_predict_with_a_metadata_head_encodes_new_rows_as_training_did(cfg, tmp_path):
    """logreg+meta_norm on images + the metadata CSV: the same predictions as at training time."""
    meta = _with_metadata(cfg)
    cfg.heads.heads = ("logreg",)
    cfg.heads.layers = ("last",)
    cfg.heads.features = ("image+meta_norm",)
    extract.run(cfg)
    heads.run(cfg)
    test_meta = meta[meta["image_id"].str.startswith("test/")].copy()
    test_meta["image_id"] = test_meta["image_id"].str.removeprefix("test/")
    test_meta.iloc[::-1].to_csv(tmp_path / "new_meta.csv", index=False)  # any row order
    cfg.predict.images = str(cfg.dataset_dir / "test")
    cfg.predict.method = "logreg+meta_norm"
    cfg.predict.image_metadata = str(tmp_path / "new_meta.csv")
    got = pd.read_csv(predict.run(cfg))
    saved = pd.read_csv(Path(cfg.artifacts) / "heads" / "toy" / "tiny_cnn@16px" / "logreg+meta_norm.predictions.csv")
    saved["id"] = saved["id"].str.removeprefix("test/")
    merged = got.merge(saved, on="id")
    assert len(merged) == 9 and (merged["predicted"] == merged["pred"]).all()
    method = methods.load(cfg, "logreg+meta_norm")
    fs = load_features(extract.cache_path(cfg))
    from pipeline.heads.features import fuse, metadata_table

    splits, _ = fuse(fs, metadata_table(cfg.metadata_path, fs), "error")
    ref = method.head.predict_proba(splits["test"].X)
    order = [list(got["id"]).index(i.removeprefix("test/")) for i in splits["test"].ids]
    np.testing.assert_allclose(got[[c for c in got.columns if c.startswith("p_")]].to_numpy()[order], ref, atol=2e-6)
    cfg.predict.image_metadata = None
    with pytest.raises(PipelineError, match="uses metadata: give the new images' table with --image-metadata"):
        predict.run(cfg)


def test_predict_applies_the_fine_tuned_model(cfg, capsys):
    from pipeline import finetune

    cfg.finetune.epochs_head = 1
    cfg.finetune.epochs_finetune = 1
    cfg.finetune.steps_per_epoch = 1
    cfg.finetune.batch_size = 6
    finetune.run(cfg)
    for name in ("finetune", "frozen_dense"):
        cfg.predict.images = str(cfg.dataset_dir / "test")
        cfg.predict.method = name
        got = pd.read_csv(predict.run(cfg))
        stem = "finetuned" if name == "finetune" else "frozen_dense"
        saved = pd.read_csv(Path(cfg.artifacts) / "models" / "toy" / f"tiny_cnn-{stem}.predictions.csv")
        saved["id"] = saved["id"].str.removeprefix("test/")
        merged = got.merge(saved, on="id")
        assert len(merged) == 9 and (merged["predicted"] == merged["pred"]).all(), name
        assert np.allclose(got[[c for c in got.columns if c.startswith("p_")]].sum(axis=1), 1.0, atol=1e-5)
    cfg.export.method = "finetune"  # without augmentation and dropout, the preprocessing a built-in layer
    out = export.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    row = pd.read_csv(Path(cfg.artifacts) / "results" / "toy.csv").set_index("method").loc["finetune"]
    assert manifest["test_accuracy"] == pytest.approx(row["test_accuracy"]) and manifest["self_contained"]
    import keras

    ids = sorted(p.relative_to(cfg.dataset_dir).as_posix() for p in (cfg.dataset_dir / "test").rglob("*.png"))
    images = _test_images(cfg, None, ids)
    exported = np.asarray(keras.models.load_model(out / "model.keras")(images))
    original = methods.load(cfg, "finetune").model(images, training=False)
    np.testing.assert_allclose(exported, np.asarray(original), atol=1e-5)


def test_a_metadata_head_exports_as_a_two_input_model(cfg):
    """image + the encoded metadata vector in, the scikit-learn head's probabilities out; encoding in the manifest."""
    _with_metadata(cfg)
    cfg.heads.heads = ("logreg",)
    cfg.heads.layers = ("all",)
    cfg.heads.features = ("image+meta_norm",)
    extract.run(cfg)
    heads.run(cfg)
    cfg.export.method = "logreg@all+meta_norm"
    out = export.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["image", "metadata"]
    names = manifest["metadata_encoding"]["names"]
    assert manifest["inputs"][1]["shape"] == [None, len(names)] and "site=a" in names
    import keras

    from pipeline.heads.features import fuse, metadata_table

    model = keras.models.load_model(out / "model.keras")
    method = methods.load(cfg, cfg.export.method)
    fs = load_features(extract.cache_path(cfg))
    splits, _ = fuse(fs.with_layers(method.record["layer_names"]), metadata_table(cfg.metadata_path, fs), "error")
    meta = splits["test"].X[:, -len(names) :]
    got = np.asarray(model([_test_images(cfg, fs), meta]))
    np.testing.assert_allclose(got, method.head.predict_proba(splits["test"].X), atol=1e-5)


def test_predict_runs_the_features_in_the_runtime_that_filled_the_cache(fitted, caplog):
    """auto: ONNX Runtime for a cache extracted in it (the heads were fitted on those numbers); --runtime tf
    gives the same classes here."""
    import h5py

    with h5py.File(extract.cache_path(fitted), "r") as f:
        assert f.attrs["runtime"] == "onnx"
    fitted.predict.images = str(fitted.dataset_dir / "test")
    fitted.predict.method = "logreg@all"
    auto = pd.read_csv(predict.run(fitted))
    assert "features in ONNX Runtime" in caplog.text
    fitted.predict.runtime = "tf"
    tf = pd.read_csv(predict.run(fitted))
    assert "features in TensorFlow" in caplog.text
    assert (auto["predicted"] == tf["predicted"]).all()
    cols = [c for c in auto.columns if c.startswith("p_")]
    np.testing.assert_allclose(auto[cols].to_numpy(), tf[cols].to_numpy(), atol=1e-4)


def test_the_streaming_probe_exports_with_its_keras_head_named_in_the_manifest(cfg):
    cfg.heads.heads, cfg.heads.layers, cfg.heads.probe_epochs = ("linear_probe",), ("last",), 2
    extract.run(cfg)
    heads.run(cfg)
    cfg.export.method = "linear_probe"
    out = export.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head_file"] == "head.keras" and (out / "head.keras").exists()
    assert not manifest["self_contained"] and not (out / "head.joblib").exists()


def test_a_head_pickled_under_the_modules_of_the_flat_layout_still_loads(tmp_path, monkeypatch):
    """Heads saved before the package was grouped by stage name ``pipeline.linear``; predict must load them."""
    import joblib

    from pipeline.estimators import linear

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)).astype(np.float32), np.repeat([0, 1, 2], 20)
    head = linear.RidgeHead().fit(X, y)
    for old in methods._MOVED:  # as in a process that has loaded no old head yet
        monkeypatch.delitem(sys.modules, old, raising=False)
    with monkeypatch.context() as m:  # pickle it as the old layout did
        m.setitem(sys.modules, "pipeline.linear", linear)
        m.setattr(linear.RidgeHead, "__module__", "pipeline.linear")
        joblib.dump(head, tmp_path / "old.joblib")
    assert b"pipeline.linear" in (tmp_path / "old.joblib").read_bytes() and "pipeline.linear" not in sys.modules
    try:
        loaded = methods._load_joblib(tmp_path / "old.joblib")
    finally:
        for old in methods._MOVED:
            sys.modules.pop(old, None)
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
