import gzip
import json

import numpy as np
import pytest

from pipeline.data import load_dataset, prepare
from pipeline.errors import PipelineError


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A tiny IDX set in the Debian package's layout: 10 classes, 12 train / 5 test images each."""
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(prepare, "FASHION_DIR", root)
    return root


def test_read_idx_parses_header_and_rejects_truncation(fake_fashion, tmp_path):
    x = prepare.read_idx(fake_fashion / "train-images-idx3-ubyte.gz")
    assert x.shape == (120, 28, 28) and x.dtype == np.uint8
    assert prepare.read_idx(fake_fashion / "train-labels-idx1-ubyte.gz")[:3].tolist() == [0, 1, 2]
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"abc")
    with pytest.raises(PipelineError, match="truncated"):
        prepare.read_idx(bad)


def test_fashion_mnist_becomes_a_stratified_image_folder(fake_fashion, tmp_path):
    target = tmp_path / "data" / "fashion-mnist"
    prepare.prepare_fashion_mnist(target, n_train=50, n_val=30, n_test=20, seed=0)
    ds = load_dataset(target)
    assert ds.class_names == sorted(prepare.FASHION_CLASSES)
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [50, 30, 20]
    assert np.bincount(ds.splits["test"].labels).tolist() == [2] * 10
    train, val = set(ds.splits["train"].ids), set(ds.splits["val"].ids)
    assert not {i.split("/")[-1] for i in train} & {i.split("/")[-1] for i in val}  # disjoint source images
    from PIL import Image

    first = ds.splits["train"].ids[0]
    img = np.asarray(Image.open(target / first))
    source = prepare.read_idx(fake_fashion / "train-images-idx3-ubyte.gz")[int(first.split("-")[-1][:5])]
    np.testing.assert_array_equal(img, source)
    assert json.loads((target / prepare.STAMP).read_text())["n_train"] == 50


def test_prepare_is_idempotent_and_never_touches_a_user_folder(fake_fashion, tmp_path, caplog):
    target = tmp_path / "fashion-mnist"
    prepare.prepare_fashion_mnist(target, 50, 30, 20, 0)
    marker = target / "train" / "keep.me"
    marker.write_text("x")
    prepare.prepare_fashion_mnist(target, 50, 30, 20, 0)
    assert marker.exists() and "already prepared" in caplog.text
    prepare.prepare_fashion_mnist(target, 60, 30, 20, 0)  # new parameters: rebuilt
    assert not marker.exists() and len(load_dataset(target).splits["train"]) == 60

    user = tmp_path / "mine"
    user.mkdir()
    with pytest.raises(PipelineError, match="not made by `make data`"):
        prepare.prepare_fashion_mnist(user, 50, 30, 20, 0)


def test_missing_package_without_root_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setattr(prepare.os, "geteuid", lambda: 1000)
    with pytest.raises(PipelineError, match="apt-get install -y dataset-fashion-mnist"):
        prepare.ensure_fashion_package()
