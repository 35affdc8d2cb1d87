"""Caches of one backbone made with other extraction settings sit side by side (tiny backbone, generated
images): a later stage with default settings uses the one variant there is and never replaces it, several
variants make a one-line choice, a cache from before variants is reused where it is, and the report shows
each variant's heads against the backbone's fine-tune."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
from conftest import TINY

from pipeline import heads, report, results
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache import variants

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


def _features(cfg) -> Path:
    return Path(cfg.artifacts) / "features" / "toy"


def _grid(key: dict) -> int:
    return variants.settings(key)["tap_grid"]


def test_a_default_stage_after_a_grid_extract_reuses_the_grid_cache_and_its_heads_read_it(cfg, caplog):
    """`make extract ARGS="--tap-grid 2"` then `make svm` (whose extract step has no --tap-grid)."""
    grid_cfg = copy.deepcopy(cfg)
    grid_cfg.extract.tap_grid = 2
    grid_cfg.explicit = ("extract.tap_grid",)
    first = extract.run(grid_cfg)
    assert first.path.name == f"{TINY}@16px-grid2.h5" and not first.cache_hit
    mtime = first.path.stat().st_mtime_ns

    plain = Config(artifacts=cfg.artifacts, data=cfg.data, backbone=cfg.backbone)  # names no extract setting
    plain.extract.batch_size = 4
    caplog.clear()
    again = extract.run(plain)
    assert again.cache_hit and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert "re-extracting" not in caplog.text and "using the cache" in caplog.text
    assert [v.path.name for v in variants.existing(_features(cfg), TINY)] == [first.path.name]

    plain.heads.heads, plain.heads.layers = ("ridge",), ("all",)
    out = heads.run(plain)
    assert out[0].layers == "all"
    table = results.read_results(results.results_path(cfg.artifacts, "toy"))
    assert set(table["backbone"]) == {f"{TINY}@16px-grid2"}  # filed under the variant it read
    record = json.loads((Path(cfg.artifacts) / "heads" / "toy" / f"{TINY}@16px-grid2" / "ridge@all.json").read_text())
    assert _grid(record["cache"]["key"]) == 2


def test_two_variants_coexist_and_each_configuration_reads_its_own(cfg):
    default = extract.run(cfg)
    notaps_cfg = copy.deepcopy(cfg)
    notaps_cfg.extract.taps = ("none",)  # away from the default: named
    notaps = extract.run(notaps_cfg)
    assert default.path != notaps.path and not notaps.cache_hit
    assert {v.tag for v in variants.existing(_features(cfg), TINY)} == {"16px", "16px-notaps"}
    with h5py.File(default.path, "r") as f:
        assert json.loads(f.attrs["tap_layers"])  # the default variant kept its taps
    assert extract.run(cfg).cache_hit and extract.run(notaps_cfg).cache_hit  # neither replaced the other
    assert extract.cache_path(cfg) == default.path and extract.cache_path(notaps_cfg) == notaps.path
    other = copy.deepcopy(cfg)
    other.extract.tap_grid, other.explicit = 3, ("extract.tap_grid",)
    with pytest.raises(PipelineError, match="no cache of tiny_cnn has these extraction settings"):
        extract.cache_path(other)  # a later stage never reads a variant the configuration contradicts


def test_several_variants_that_fit_are_listed_in_one_line(cfg):
    cfg.extract.taps = ("none",)
    extract.run(cfg)
    cfg.extract.taps, cfg.extract.tap_grid = ("stages",), 2
    extract.run(cfg)
    free = Config(artifacts=cfg.artifacts, data=cfg.data, backbone=cfg.backbone)  # names nothing, no exact one
    with pytest.raises(PipelineError) as e:
        extract.cache_path(free)
    text = str(e.value)
    assert "2 cache variants fit these settings" in text and "--taps / --tap-grid / --views" in text
    assert "\n" not in text and f"{TINY}@16px-notaps.h5" in text and f"{TINY}@16px-grid2.h5" in text


def test_a_cache_from_before_variants_is_reused_where_it_is(cfg, caplog):
    made = extract.run(cfg)
    old = made.path.with_name(f"{TINY}.h5")  # how a cache was named before variants
    made.path.rename(old)
    caplog.clear()
    again = extract.run(cfg)
    assert again.cache_hit and again.path == old and "re-extracting" not in caplog.text
    assert [v.path for v in variants.existing(_features(cfg), TINY)] == [old]
    cfg.heads.heads, cfg.heads.layers = ("ridge",), ("last",)
    heads.run(cfg)
    table = results.read_results(results.results_path(cfg.artifacts, "toy"))
    assert set(table["backbone"]) == {TINY}  # its heads stay where they were filed
    assert (Path(cfg.artifacts) / "heads" / "toy" / TINY / "ridge.joblib").exists()


def test_the_report_compares_each_variants_heads_with_the_backbones_fine_tune(tmp_path):
    from test_report import _report_cfg

    cfg = _report_cfg(tmp_path)
    rows = [
        ("b0", "finetune", 0.90, 400.0, 0.0),
        ("b0", "frozen_dense", 0.80, 40.0, 0.0),
        ("b0@112px", "logreg", 0.91, 5.0, 10.0),
        ("b0@224px", "logreg", 0.88, 5.0, 40.0),
    ]
    for b, m, acc, sec, ext in rows:
        results.upsert(
            results.results_path(cfg.artifacts, "d"),
            dict(dataset="d", backbone=b, method=m, features="image", layers="last", test_accuracy=acc)
            | dict(val_accuracy=acc, train_seconds=sec, extract_seconds=ext, n_train=300, n_test=400, params="{}"),
        )
    out = report.run(cfg)
    summary = pd.read_csv(out.parent / "summary.csv").set_index(["backbone", "method"])
    assert set(summary.index.get_level_values(0)) == {"b0@112px", "b0@224px"}
    assert summary.loc[("b0@112px", "logreg"), "delta_pt"] == pytest.approx(1.0)
    assert summary.loc[("b0@224px", "logreg"), "delta_pt"] == pytest.approx(-2.0)
    assert summary.loc[("b0@224px", "finetune"), "test_accuracy"] == pytest.approx(0.90)
    text = (out.parent / "report.md").read_text()
    assert "b0@112px: Best frozen head" in text and "b0@224px: Best frozen head" in text
