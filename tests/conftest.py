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
SHARED_RUNTIMES: Path | None = None  # set for the session by `_shared_runtimes`


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


def toy_presplit(base: Path) -> Path:
    """base/data/toy/{train,val,test}/<class>/*.png"""
    root = base / "data" / "toy"
    for k, (split, n) in enumerate((("train", 6), ("val", 3), ("test", 3))):
        write_images(root / split, n, seed=k)
    return root


def toy_config(base: Path) -> Config:
    """The tiny backbone on ``toy_presplit(base)``'s images, artifacts in base/artifacts."""
    c = Config()
    c.artifacts = str(base / "artifacts")
    c.data.dataset = str(base / "data" / "toy")
    c.backbone.backbone = TINY
    c.backbone.weights = "none"
    c.extract.batch_size = 4
    c.extract.runtimes_dir = str(SHARED_RUNTIMES) if SHARED_RUNTIMES else ""
    return c


def session_folder(tmp_path_factory) -> Path:
    """A folder the whole session shares, both xdist workers included (their base temps are siblings)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def copy_of(built: Path, base: Path) -> Config:
    """A test's own copy of a tree that a module-scoped fixture built once (images and artifacts, their
    timestamps kept, so every cache and record stays up to date): the test may change it freely."""
    import shutil

    shutil.copytree(built, base, dirs_exist_ok=True, symlinks=True)
    return toy_config(base)


@pytest.fixture
def presplit(tmp_path) -> Path:
    """data/toy/{train,val,test}/<class>/*.png"""
    return toy_presplit(tmp_path)


@pytest.fixture
def flat(tmp_path) -> Path:
    """data/flat/<class>/*.png, to be split by the loader."""
    return write_images(tmp_path / "data" / "flat", 10)


@pytest.fixture
def cfg(tmp_path, presplit) -> Config:
    return toy_config(tmp_path)


FIRST = ("test_finetune_workers.py", "test_forecast.py", "test_estimator_contract.py", "test_finetune.py")


def pytest_collection_modifyitems(items):
    """scikit-learn's contract checks of the Keras MLP train a network each: not in `make test-fast`. The
    modules with the longest tests run first (each kept whole, for its module fixtures), so that the many
    short ones even out where the pytest workers finish."""
    for item in items:
        if "KerasMLP" in item.nodeid:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@pytest.fixture(scope="session", autouse=True)
def _shared_runtimes(tmp_path_factory):
    """One folder of converted models for the whole session, both xdist workers included: converting the
    tiny backbone costs a child process with TensorFlow and the converter, far more than extracting with it,
    and its conversion is the same in every test that uses ``toy_config``. The tests of conversion itself
    use their artifacts' own folder (``own_runtimes``)."""
    global SHARED_RUNTIMES
    SHARED_RUNTIMES = session_folder(tmp_path_factory) / "shared-runtimes"
    SHARED_RUNTIMES.mkdir(exist_ok=True)
    yield
    SHARED_RUNTIMES = None


@pytest.fixture
def own_runtimes(cfg):
    """``cfg`` as a user has it, converting into its own artifacts' ``runtimes/``: for tests that watch a
    conversion happen."""
    cfg.extract.runtimes_dir = ""
    return cfg


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="pipeline")


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def make_celeba_like(root: Path, n_images: int = 36, n_rows: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """A folder laid out like CelebA: ``img_align_celeba/000001.jpg``... (generated face-like images: a skin
    ellipse, two eyes, a mouth; 'Male' faces get a dark beard band, so the class is learnable) and a
    ``list_attr_celeba.txt`` (count line, 40 attribute names, ``filename  1 -1 ...`` rows) with rows for
    more images than the folder holds, as when a user trains on a subset."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    attrs = rng.choice([-1, 1], size=(n_rows, len(CELEBA_ATTRIBUTES)))
    male = CELEBA_ATTRIBUTES.index("Male")
    attrs[:, male] = np.where(np.arange(n_rows) % 2 == 0, 1, -1)
    for k in range(n_images):
        img = Image.new("RGB", (24, 24), tuple(int(v) for v in rng.integers(0, 80, 3)))
        d = ImageDraw.Draw(img)
        skin = tuple(int(v) for v in np.clip(np.array([220, 180, 150]) + rng.normal(0, 12, 3), 0, 255))
        d.ellipse((4, 2, 20, 22), fill=skin)
        d.ellipse((8, 8, 10, 10), fill=(30, 30, 30))
        d.ellipse((14, 8, 16, 10), fill=(30, 30, 30))
        if attrs[k, male] == 1:
            d.rectangle((6, 15, 18, 21), fill=(50, 35, 25))
        d.line((10, 17, 14, 17), fill=(150, 40, 40))
        img.save(images / f"{k + 1:06d}.jpg", quality=95)
    lines = [str(n_rows), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{k + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in attrs[k]) for k in range(n_rows)]
    table = root / "list_attr_celeba.txt"
    table.write_text("\n".join(lines) + "\n")
    return images, table
