"""Fixtures: generated image datasets and a tiny registered backbone, so the suite is fast."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import backbones
from pipeline.config import Config

TINY = "tiny_cnn"


def _build_tiny(weights, input_size):
    import keras

    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, x, name=TINY)
    if weights is not None:
        model.load_weights(weights)
    return model


backbones.register(backbones.BackboneSpec(TINY, 16, "x / 255", "unit", _build_tiny, "test"))

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_image(rng: np.random.Generator, cls: int, size: int = 20) -> np.ndarray:
    """A noisy image whose dominant colour is its class: learnable by a tiny CNN."""
    base = np.array(COLOURS[cls % len(COLOURS)], dtype=float)
    img = base + rng.normal(0, 25, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n_per_class: int, classes=("red", "green", "blue"), seed: int = 0, ext: str = "png"):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(make_image(rng, c)).save(folder / name / f"{name}_{i:03d}.{ext}")
    return folder


@pytest.fixture
def presplit(tmp_path) -> Path:
    """data/toy/{train,val,test}/<class>/*.png"""
    root = tmp_path / "data" / "toy"
    for k, (split, n) in enumerate((("train", 6), ("val", 3), ("test", 3))):
        write_images(root / split, n, seed=k)
    return root


@pytest.fixture
def flat(tmp_path) -> Path:
    """data/flat/<class>/*.png, to be split by the loader."""
    return write_images(tmp_path / "data" / "flat", 10)


@pytest.fixture
def cfg(tmp_path, presplit) -> Config:
    c = Config()
    c.artifacts = str(tmp_path / "artifacts")
    c.data.dataset = str(presplit)
    c.backbone.backbone = TINY
    c.backbone.weights = "none"
    c.extract.batch_size = 4
    return c


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="pipeline")
