"""`make curve`: does fine-tuning start to pay with more labelled data? Heads and fine-tune on
nested stratified subsets of the training split, each point a results row keyed by ``n_train``.

The heads are refitted with exactly the tuning of `make svm` (same grids, same val split) on the
cached features of the subset; the fine-tune runs at a few sizes only (it is the expensive
method). A point whose inputs match a saved result is reused, so extending the curve by one size
computes only that size; the full-size point is the `make svm` / `make finetune` result itself.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np

from pipeline import finetune, heads, results
from pipeline.backbones.model_file import name_for
from pipeline.cache.key import cache_path
from pipeline.cache.reader import load_features
from pipeline.config import Config
from pipeline.data import from_config, nested_subset
from pipeline.errors import PipelineError
from pipeline.heads import registry

log = logging.getLogger(__name__)
MIN_PER_CLASS = 2


def sizes(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> dict[float, int]:
    """Fraction -> the number of training images its nested subset holds (at least 2 per class)."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise PipelineError(f"--fractions must be in (0, 1], not {', '.join(map(str, bad))}")
    n = len(labels)
    return {f: len(nested_subset(labels, max(1, round(f * n)), seed, MIN_PER_CLASS)) for f in sorted(fractions)}


def run(cfg: Config) -> list[int]:
    """Every point of the curve; returns the sizes."""
    ds = from_config(cfg)
    labels = ds.splits["train"].labels
    n_full = len(labels)
    by_fraction = sizes(labels, cfg.curve.fractions, cfg.data.seed)
    points = sorted(set(by_fraction.values()))
    ft_fracs = cfg.curve.finetune_fractions or (min(by_fraction), max(by_fraction))
    unknown = [f for f in ft_fracs if f and f not in by_fraction]
    if unknown:
        raise PipelineError(f"--finetune-fractions {unknown} are not among --fractions {list(by_fraction)}")
    ft_points = sorted({by_fraction[f] for f in ft_fracs if f})
    log.info("learning curve on %s: %s training images (fine-tune at %s)", ds.name, points, ft_points or "none")

    head_cfg = copy.deepcopy(cfg)
    streamed = [h for h in cfg.heads.heads if registry.get(h).streaming]
    if streamed:
        log.info("notice: %s stream from the cache and are left out of the curve", ", ".join(streamed))
    head_cfg.heads.heads = tuple(h for h in cfg.heads.heads if h not in streamed)
    backbone = name_for(cfg.backbone.backbone)
    # read the cache once for all points, and only if some point has heads to fit
    load = functools.cache(lambda: load_features(cache_path(cfg.artifacts, cfg.dataset_name, backbone), backbone))
    for n in points:
        log.info("curve point: %d of %d training images", n, n_full)
        if head_cfg.heads.heads:
            heads.run(head_cfg, n_subset=n if n < n_full else None, load=load)
        if n in ft_points:
            finetune.run(cfg, ds, n_subset=n if n < n_full else None)
    table = results.read_results(results.results_path(cfg.artifacts, cfg.dataset_name))
    mine = table[(table["backbone"] == name_for(cfg.backbone.backbone)) & table["n_train"].isin(points)]
    mine = mine[mine["features"] == "image"].sort_values(["method", "layers", "n_train"])
    print("\nlearning curve (test accuracy by training images):")
    wide = mine.pivot_table(index=["method", "layers"], columns="n_train", values="test_accuracy")
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    return points
