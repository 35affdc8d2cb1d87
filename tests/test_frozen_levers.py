"""benchmarks/frozen_levers.py: its mirrored dataset and combined caches are what the heads stage reads."""

import copy
import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import heads
from pipeline.extract import stage as extract

_spec = importlib.util.spec_from_file_location(
    "frozen_levers", Path(__file__).parents[1] / "benchmarks" / "frozen_levers.py"
)
levers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(levers)

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def test_flip_mirrors_every_image_under_the_same_name(presplit, tmp_path):
    levers.flip(presplit, tmp_path / "flip")
    for src in presplit.rglob("*.png"):
        out = np.asarray(Image.open(tmp_path / "flip" / src.relative_to(presplit)))
        assert np.array_equal(out, np.asarray(Image.open(src))[:, ::-1])


def test_flip_averaged_and_concatenated_caches_are_fitted_by_the_heads_stage(cfg, presplit, tmp_path):
    levers.flip(presplit, tmp_path / "flip" / "toy")
    plain = extract.run(cfg).path
    mirrored_cfg = copy.deepcopy(cfg)
    mirrored_cfg.data.dataset, mirrored_cfg.artifacts = str(tmp_path / "flip" / "toy"), str(tmp_path / "mirrored")
    mirrored = extract.run(mirrored_cfg).path
    for how in ("mean", "concat"):
        out = tmp_path / how / "features" / "toy" / plain.name
        levers.combine(how, plain, mirrored, out)
        with h5py.File(plain) as a, h5py.File(mirrored) as b, h5py.File(out) as o:
            x, y, z = a["test/embeddings"][()], b["test/embeddings"][()], o["test/embeddings"][()]
            want = (x + y) / 2 if how == "mean" else np.hstack([x, y])
            assert np.allclose(z, want) and not np.allclose(x, y)
            assert o.attrs["extract_seconds"] == a.attrs["extract_seconds"] + b.attrs["extract_seconds"]
            assert len(o["test/taps"]) == len(a["test/taps"]) * (2 if how == "concat" else 1)
        head_cfg = copy.deepcopy(cfg)
        head_cfg.artifacts, head_cfg.heads.heads, head_cfg.heads.layers = str(tmp_path / how), ("ridge",), ("all",)
        (res,) = heads.run(head_cfg)
        with h5py.File(plain) as a:
            n_taps = len(a["test/taps"])
        assert len(res.layer_names) == 1 + n_taps * (2 if how == "concat" else 1)  # every block of both caches
        assert 0 <= res.scores["test_accuracy"] <= 1
