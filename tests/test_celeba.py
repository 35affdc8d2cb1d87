"""The headline user workflow: CelebA's flat image folder + list_attr_celeba.txt, class from `Male`,
the other 39 attributes as metadata (a generated look-alike: no download)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CELEBA_ATTRIBUTES, TINY, make_celeba_like

from pipeline import cli, heads, results
from pipeline.config import Config
from pipeline.data import load_labelled
from pipeline.extract import stage as extract

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def test_labels_come_from_the_table_and_extra_rows_are_ignored_with_a_warning(tmp_path, caplog):
    images, table = make_celeba_like(tmp_path)
    ds = load_labelled(images, table, "Male", seed=0)
    assert ds.class_names == ["not_Male", "Male"]
    ids = ds.all_ids()
    assert len(ids) == 36 and len(set(ids)) == 36
    for s in ("train", "val", "test"):  # stratified: both classes in every split
        assert set(ds.splits[s].labels) == {0, 1}
    rows = table.read_text().splitlines()[2:]
    male = {r.split()[0]: int(r.split()[1 + CELEBA_ATTRIBUTES.index("Male")]) for r in rows}
    for s in ("train", "val", "test"):
        for i, y in zip(ds.splits[s].ids, ds.splits[s].labels):
            assert male[i] == (1 if y == 1 else -1)
    assert "24 rows for images not in img_align_celeba (ignored)" in caplog.text


def test_missing_label_column_and_images_without_a_row_are_said(tmp_path, caplog):
    images, table = make_celeba_like(tmp_path)
    (images / "999999.jpg").write_bytes((images / "000001.jpg").read_bytes())  # an image with no row
    ds = load_labelled(images, table, "Male", seed=0)
    assert "999999.jpg" not in ds.all_ids() and "1 images have no row or no 'Male'" in caplog.text
    import pytest

    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="has no column 'male'"):
        load_labelled(images, table, "male")
    with pytest.raises(PipelineError, match="needs --label-column"):
        load_labelled(images, table, None)


def test_celeba_headline_comparison_end_to_end_with_the_39_other_attributes_as_metadata(tmp_path, capsys):
    images, table = make_celeba_like(tmp_path, n_images=48, n_rows=80)
    art = tmp_path / "artifacts"
    common = ["--dataset", str(images), "--labels", str(table), "--label-column", "Male", "--artifacts", str(art)]
    bb = ["--backbone", TINY, "--weights", "none"]
    assert cli.main(["data", *common]) == 0
    assert cli.main(["extract", *common, *bb]) == 0
    cfg = Config()
    cfg.artifacts = str(art)
    cfg.data.dataset, cfg.data.labels, cfg.data.label_column = str(images), str(table), "Male"
    cfg.backbone.backbone, cfg.backbone.weights = TINY, "none"
    cfg.heads.heads, cfg.heads.layers = ("logreg",), ("last",)
    cfg.heads.c_grid, cfg.heads.meta_weights = (0.1, 1.0), (1.0,)
    out = heads.run(cfg)
    assert {r.features for r in out} == {"image", "image+meta", "image+meta_norm"}
    side = Path(art) / "heads" / "img_align_celeba" / f"{TINY}@16px" / "logreg+meta.json"
    columns = pd.read_json(side, typ="series")["metadata_columns"]
    assert len(columns) == 39 and "Male" not in columns  # the class column is never a feature
    table_ = results.read_results(results.results_path(art, "img_align_celeba"))
    assert len(table_) == 3 and table_["test_accuracy"].between(0, 1).all()
    assert cli.main(["report", *common]) == 0
    report = (art / "reports" / "img_align_celeba" / "report.md").read_text()
    assert "Accuracy per metadata subgroup" in report and "| Smiling |" in report
    assert extract.cache_path(cfg).exists() and np.isfinite(table_["val_accuracy"]).all()
