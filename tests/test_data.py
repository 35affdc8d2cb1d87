import logging

import numpy as np
import pandas as pd
import pytest
from conftest import write_images

from pipeline.data import image_dataset, load_dataset, load_metadata, stratified_split
from pipeline.errors import PipelineError


def test_presplit_folders_are_read_with_sorted_ids_and_labels(presplit):
    ds = load_dataset(presplit)
    assert ds.class_names == ["blue", "green", "red"]
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [18, 9, 9]
    assert ds.splits["train"].ids[0] == "train/blue/blue_000.png"
    assert ds.splits["train"].ids == sorted(ds.splits["train"].ids)
    assert set(ds.splits["train"].labels.tolist()) == {0, 1, 2}
    assert all(ds.class_names[y] in i for i, y in zip(ds.splits["test"].ids, ds.splits["test"].labels))


def test_flat_folder_gets_a_seeded_stratified_split(flat):
    a = load_dataset(flat, 0.2, 0.2, seed=1)
    b = load_dataset(flat, 0.2, 0.2, seed=1)
    c = load_dataset(flat, 0.2, 0.2, seed=2)
    assert a.splits["val"].ids == b.splits["val"].ids
    assert a.splits["val"].ids != c.splits["val"].ids
    for s, n in (("train", 6), ("val", 2), ("test", 2)):
        assert np.bincount(a.splits[s].labels).tolist() == [n, n, n]
    all_ids = [i for s in ("train", "val", "test") for i in a.splits[s].ids]
    assert len(all_ids) == len(set(all_ids)) == 30


def test_stratified_split_partitions_indices():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    parts = stratified_split(y, [0.1, 0.2], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert np.bincount(y[parts[2]]).tolist() == [10, 6, 4]


def test_empty_class_folder_is_a_clear_error(flat):
    (flat / "purple").mkdir()
    with pytest.raises(PipelineError, match="class folder flat/purple has no images"):
        load_dataset(flat)


def test_single_class_is_a_clear_error(tmp_path):
    write_images(tmp_path / "one", 5, classes=("only",))
    with pytest.raises(PipelineError, match="single class"):
        load_dataset(tmp_path / "one")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_non_image_files_are_ignored_and_listed(flat):
    (flat / "red" / "notes.txt").write_text("hello")
    ds = load_dataset(flat)
    assert ds.ignored == ["red/notes.txt"]
    assert not any(i.endswith(".txt") for s in ds.splits.values() for i in s.ids)


def test_fingerprint_changes_with_the_file_list(presplit):
    before = load_dataset(presplit).fingerprint()
    assert load_dataset(presplit).fingerprint() == before
    (presplit / "train" / "red" / "red_000.png").unlink()
    assert load_dataset(presplit).fingerprint() != before


def test_metadata_joins_by_filename_like_celeba_in_any_row_order(flat, tmp_path):
    ds = load_dataset(flat)
    ids = [i for s in ("train", "val", "test") for i in ds.splits[s].ids]
    # CelebA's list_attr_celeba.csv: image_id is the bare filename, attributes are +-1.
    glasses = {i: (1 if k % 3 == 0 else -1) for k, i in enumerate(ids)}
    rows = [(i.split("/")[-1], glasses[i]) for i in ids][::-1]
    csv = tmp_path / "list_attr_celeba.csv"
    pd.DataFrame(rows, columns=["image_id", "Eyeglasses"]).to_csv(csv, index=False)
    meta = load_metadata(csv, ds.all_ids(), dataset_name=ds.name)
    assert meta.loc[ids, "Eyeglasses"].tolist() == [glasses[i] for i in ids]


def test_metadata_keyed_by_relative_path_when_filenames_repeat_across_splits(presplit, tmp_path):
    ds = load_dataset(presplit)
    ids = [i for s in ("train", "val", "test") for i in ds.splits[s].ids]
    csv = tmp_path / "m.csv"
    pd.DataFrame({"id": ids, "n": range(len(ids))}).to_csv(csv, index=False)
    assert load_metadata(csv, ds.all_ids(), dataset_name=ds.name).loc[ids[-1], "n"] == len(ids) - 1
    pd.DataFrame({"id": [i.split("/")[-1] for i in ids[:5]], "n": range(5)}).to_csv(csv, index=False)
    with pytest.raises(PipelineError, match="match no image"):
        load_metadata(csv, ds.all_ids(), dataset_name=ds.name)  # bare filenames are ambiguous here: refuse, never guess


def test_metadata_by_relative_path_duplicates_and_unknown_ids(flat, tmp_path, caplog):
    ds = load_dataset(flat)
    ids = [i for s in ("train", "val", "test") for i in ds.splits[s].ids]
    csv = tmp_path / "m.csv"
    pd.DataFrame({"filename": [i.split("/")[-1] for i in ids], "age": range(len(ids))}).to_csv(csv, index=False)
    meta = load_metadata(csv, ds.all_ids(), dataset_name=ds.name)
    assert meta.index.name == "id" and set(meta.index) == set(ids)
    assert meta.loc[ids[3], "age"] == 3

    pd.DataFrame({"filename": ["red_000.png", "red_000.png"], "age": [1, 2]}).to_csv(csv, index=False)
    with pytest.raises(PipelineError, match="duplicate ids.*red_000.png"):
        load_metadata(csv, ds.all_ids(), dataset_name=ds.name)
    pd.DataFrame({"filename": ["red_000.png", "ghost.png"], "age": [1, 2]}).to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING):
        meta = load_metadata(csv, ds.all_ids(), dataset_name=ds.name)  # rows without an image: warned, ignored
    assert list(meta["age"]) == [1] and meta.index[0].endswith("red_000.png")
    assert any("1 rows for images not in flat (ignored), e.g. ghost.png" in r.getMessage() for r in caplog.records)


def test_image_dataset_decodes_gray_to_rgb_resizes_and_skips_corrupt(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "gray.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.jpg")
    paths = [str(tmp_path / n) for n in ("gray.png", "bad.png", "black.jpg")]
    batches = list(image_dataset(paths, 16, batch_size=8))
    images, index = batches[0]
    assert images.shape == (2, 16, 16, 3)
    assert index.numpy().tolist() == [0, 2]
    assert np.allclose(images.numpy()[0], 200, atol=1)
    assert np.allclose(images.numpy()[1], 0, atol=1)


def test_celeba_attribute_file_is_read_directly_and_extra_rows_are_ignored(flat, tmp_path, caplog):
    ds = load_dataset(flat)
    names = [i.split("/")[-1] for i in ds.all_ids()]
    lines = [str(len(names) + 2), "Male  Smiling"]
    lines += [f"{n}  {1 if k % 2 else -1} {-1 if k % 3 else 1}" for k, n in enumerate(names)]
    lines += ["999998.jpg  1 1", "999999.jpg -1 -1"]  # CelebA has rows for images the user did not keep
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        meta = load_metadata(path, ds.all_ids(), dataset_name=ds.name)
    assert list(meta.columns) == ["Male", "Smiling"] and len(meta) == len(names)
    assert set(meta["Male"]) == {-1, 1} and meta.loc[ds.all_ids()[1], "Male"] == 1
    assert any("2 rows for images not in" in r.getMessage() for r in caplog.records)


def test_a_class_too_small_for_every_split_is_named_with_what_it_means(tmp_path, caplog):
    from conftest import write_images

    from pipeline.data import load_dataset

    root = write_images(tmp_path / "flat", 10, classes=("cat", "dog"))
    write_images(root, 1, classes=("axolotl",), seed=5)
    ds = load_dataset(root, 0.2, 0.2, seed=0)
    assert "axolotl" in ds.class_names and len(ds.splits["train"]) + len(ds.splits["test"]) > 0
    lines = [r.getMessage() for r in caplog.records if "axolotl" in r.getMessage()]
    assert len(lines) == 1 and "has 1 image and none in val or test" in lines[0]
    assert "the test accuracy cannot speak for it" in lines[0] and "tuning never sees it" in lines[0]
    assert not any("'cat'" in r.getMessage() for r in caplog.records)


def test_a_single_class_validation_split_is_said_before_tuning(tmp_path, caplog):
    import numpy as np

    from pipeline.config import Config
    from pipeline.extract.cache.reader import SplitData
    from pipeline.heads import fit_head

    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    split = lambda yy: SplitData(rng.normal(size=(len(yy), 4)).astype(np.float32) + yy[:, None], yy, np.arange(len(yy)))  # noqa: E731
    splits = {"train": split(y), "val": split(np.zeros(10, dtype=int)), "test": split(y)}
    cfg = Config()
    cfg.heads.alpha_grid = (1.0, 10.0)
    fit_head("ridge", "image", splits, 4, cfg.heads, cfg.data.seed)
    assert "validation split holds a single class" in caplog.text
