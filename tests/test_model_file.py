"""--backbone PATH: a model the user trained or downloaded elsewhere (.keras, .h5, SavedModel)."""

from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

from pipeline import finetune, heads
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


def _user_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(12, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs, name="mine")


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """The user's model saved once: every test's copy has the same bytes, so its conversions are shared."""
    model = _user_model()
    path = tmp_path_factory.mktemp("user_model") / "my model.keras"
    model.save(path)
    return path, model


@pytest.fixture
def model_cfg(cfg, tmp_path, user_model):
    import shutil

    saved, model = user_model
    path = tmp_path / saved.name
    shutil.copyfile(saved, path)
    cfg.backbone.backbone = str(path)
    cfg.backbone.weights = "default"
    cfg.extract.taps = ("none",)
    return cfg, model


def _cache(cfg):
    path = extract.cache_path(cfg)
    with h5py.File(path) as f:
        return path, dict(f.attrs), f["test"]["embeddings"][()]


def test_a_keras_file_is_a_backbone_pooled_at_its_last_spatial_layer(model_cfg):
    cfg, model = model_cfg
    extract.run(cfg)
    path, attrs, emb = _cache(cfg)
    assert path.name == "my_model@16px-notaps.h5" and attrs["backbone"] == "my_model"
    assert emb.shape[1] == 12  # c2 (the last spatial output) average-pooled
    assert attrs["weights_sha256"] and "model file" in attrs["weights"]
    # the same numbers as the user's own model up to its c2 layer, on raw pixels (--preprocessing none)
    from pipeline.data import image_dataset, load_dataset

    ds = load_dataset(cfg.dataset_dir)
    images = np.concatenate([b[0].numpy() for b in image_dataset(ds.paths("test"), 16, 64)])
    inner = keras.Model(model.inputs, model.get_layer("gap").output)
    np.testing.assert_allclose(emb, inner.predict(images, verbose=0), rtol=1e-4, atol=1e-5)
    cfg.heads.heads, cfg.heads.layers, cfg.heads.c_grid = ("logreg",), ("last",), (1.0,)
    r = heads.run(cfg)[0]  # the heads find the cache by the model's name and file their results under its label
    assert (r.head, r.n_train, len(r.test_pred)) == ("logreg", 18, 9)
    table = pd.read_csv(Path(cfg.artifacts) / "results" / "toy.csv")
    assert table["backbone"].tolist() == ["my_model@16px-notaps"]
    assert (Path(cfg.artifacts) / "heads" / "toy" / "my_model@16px-notaps" / "logreg.json").exists()


def test_layer_and_preprocessing_are_part_of_the_cache_key(model_cfg, caplog):
    cfg, _ = model_cfg
    extract.run(cfg)
    cfg.backbone.layer = "logits"  # a vector output is used as is
    extract.run(cfg)
    assert "stale" in caplog.text and _cache(cfg)[2].shape[1] == 5
    cfg.backbone.layer = "c1"
    cfg.backbone.preprocessing = "tf"
    extract.run(cfg)
    _, attrs, emb = _cache(cfg)
    assert emb.shape[1] == 8 and attrs["preprocessing"].startswith("tf (")
    cfg.backbone.layer = "nope"
    with pytest.raises(PipelineError, match="no layer 'nope'"):
        extract.run(cfg)
    cfg.backbone.layer, cfg.backbone.preprocessing = None, "bgr"
    with pytest.raises(PipelineError, match="unknown --preprocessing 'bgr'"):
        extract.run(cfg)


def test_h5_models_and_savedmodel_folders_work_too(cfg, tmp_path):
    model = _user_model()
    model.save(tmp_path / "legacy.h5")
    model.export(tmp_path / "exported", verbose=False)
    cfg.backbone.weights = "default"
    cfg.extract.taps = ("none",)
    widths = {}
    for name in ("legacy.h5", "exported"):
        cfg.backbone.backbone = str(tmp_path / name)
        extract.run(cfg)
        path, attrs, emb = _cache(cfg)
        widths[attrs["backbone"]] = emb.shape[1]
    assert widths == {"legacy": 12, "exported": 5}  # a SavedModel only exposes its output: the logits
    cfg.backbone.backbone = str(tmp_path / "missing.keras")
    with pytest.raises(PipelineError, match="missing.keras does not exist"):
        extract.run(cfg)


def test_finetune_accepts_the_same_model_file(model_cfg):
    cfg, _ = model_cfg
    cfg.finetune.epochs_head, cfg.finetune.epochs_finetune = 1, 1
    cfg.finetune.steps_per_epoch, cfg.finetune.batch_size = 1, 6
    res = finetune.run(cfg)
    assert res.model_path.name == "my_model-finetuned.keras" and len(res.phase_seconds) == 2


def test_taps_work_on_a_model_file(model_cfg):
    cfg, _ = model_cfg
    cfg.extract.taps = ("c1",)
    extract.run(cfg)
    with h5py.File(extract.cache_path(cfg)) as f:
        assert f["test"]["taps"]["c1"].shape == (9, 8) and f["test"]["embeddings"].shape == (9, 12)


def test_the_input_size_is_read_from_the_saved_config_without_loading_the_model(tmp_path, monkeypatch):
    """What `heads` and `report` need of a model file, read as the loaded model would say it; where the file
    does not say plainly the model is loaded instead (and gives its own clear error)."""
    from pipeline.backbones import model_file

    flexible = keras.Input((None, None, 3))
    several = [keras.Input((16, 16, 3)), keras.Input((16, 16, 3))]
    models = {
        "functional.keras": _user_model(),
        "functional.h5": _user_model(),
        "sequential.keras": keras.Sequential([keras.Input((20, 20, 3)), keras.layers.Conv2D(2, 3)]),
        "flexible.keras": keras.Model(flexible, keras.layers.GlobalAveragePooling2D()(flexible)),
        "several.keras": keras.Model(several, keras.layers.Add()(several)),
    }
    for name, model in models.items():
        model.save(tmp_path / name)
    read = {name: model_file.declared_size(tmp_path / name) for name in models}
    assert read == {
        "functional.keras": (True, 16),
        "functional.h5": (False, None),  # loaded: its config is in HDF5, which only the cache package opens
        "sequential.keras": (True, 20),
        "flexible.keras": (True, None),
        "several.keras": (False, None),
    }
    for name in ("functional.keras", "sequential.keras", "flexible.keras"):
        assert read[name][1] == model_file.native_size(model_file.load(tmp_path / name))
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    assert model_file.declared_size(tmp_path / "broken.keras") == (False, None)
    with pytest.raises(PipelineError, match="several inputs"):
        model_file.native_size(model_file.load(tmp_path / "several.keras"))
    from pipeline import backbones
    from pipeline.config import BackboneConfig

    monkeypatch.setattr(model_file, "load", lambda path: pytest.fail(f"{path.name} was loaded"))
    assert backbones.from_config(BackboneConfig(backbone=str(tmp_path / "functional.keras"))).input_size == 16
