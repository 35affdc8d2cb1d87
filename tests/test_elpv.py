"""elpv preparation on a handful of generated cells (the real loader is monkeypatched)."""

import numpy as np
import pandas as pd
import pytest

from pipeline.data import load_dataset, load_metadata, prepare


@pytest.fixture
def fake_elpv(monkeypatch):
    rng = np.random.default_rng(0)
    n = 48
    names = [f"cell{i:04d}.png" for i in range(1, n + 1)]
    proba = np.tile([0.0, 1 / 3, 2 / 3, 1.0], n // 4)
    types = np.repeat(["mono", "poly"], n // 2)
    images = rng.integers(0, 255, (n, 30, 30), dtype=np.uint8)
    monkeypatch.setattr(prepare, "load_elpv", lambda: (names, images, proba, types))
    return names, images, proba, types


def test_elpv_becomes_split_folders_and_metadata_without_the_label(fake_elpv, tmp_path):
    names, images, proba, types = fake_elpv
    target = tmp_path / "elpv"
    prepare.prepare_elpv(target, 2, 0.25, 0.25, seed=0)
    ds = load_dataset(target)
    assert ds.class_names == ["defective", "functional"]
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [24, 12, 12]
    meta = pd.read_csv(target / "metadata.csv")
    assert list(meta.columns) == ["image_id", "type"]  # nothing derived from the defect probability
    joined = load_metadata(target / "metadata.csv", ds.all_ids(), dataset_name="elpv")
    for split in ("train", "val", "test"):
        s = ds.splits[split]
        got = pd.DataFrame({"cls": np.asarray(ds.class_names)[s.labels], "type": joined.loc[s.ids, "type"].to_numpy()})
        assert got.value_counts().min() >= 2 and len(got.value_counts()) == 4  # stratified on class x type
    first = ds.splits["test"].ids[0]
    i = names.index(first.split("/")[-1])
    assert first.split("/")[1] == ("defective" if proba[i] >= 0.5 else "functional")
    assert joined.loc[first, "type"] == types[i]
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(target / first)), images[i])


def test_elpv_four_class_option_keeps_the_probability_levels(fake_elpv, tmp_path):
    prepare.prepare_elpv(tmp_path / "elpv4", 4, 0.25, 0.25, seed=0)
    ds = load_dataset(tmp_path / "elpv4")
    assert ds.class_names == ["prob_0", "prob_1", "prob_1_3", "prob_2_3"]
    counts = np.bincount(ds.splits["train"].labels).tolist()
    assert len(counts) == 4 and len(set(counts)) == 1  # every level, equally represented


def test_elpv_metadata_feeds_the_heads_with_type_only(fake_elpv, tmp_path):
    from pipeline.extract.cache.reader import FeatureSet, SplitData
    from pipeline.heads.features import metadata_table

    target = tmp_path / "elpv"
    prepare.prepare_elpv(target, 2, 0.25, 0.25, seed=0)
    ds = load_dataset(target)
    splits = {
        s: SplitData(
            np.zeros((len(ds.splits[s]), 4), np.float32),
            ds.splits[s].labels,
            np.asarray(ds.splits[s].ids, dtype=object),
        )
        for s in ("train", "val", "test")
    }
    fs = FeatureSet(tmp_path / "elpv" / "x.h5", splits, ds.class_names, {"backbone": "x"})
    assert list(metadata_table(target / "metadata.csv", fs).columns) == ["type"]
