"""`make curve`: does fine-tuning start to pay with more labelled data? Heads and fine-tune on
nested stratified subsets of the training split, each point a results row keyed by ``n_train``.

The heads are refitted with exactly the tuning of `make svm` (same grids, same val split) on the
cached features of the subset; the fine-tune runs at a few sizes only (it is the expensive
method). A point whose inputs match a saved result is reused, so extending the curve by one size
computes only that size; the full-size point is the `make svm` / `make finetune` result itself.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import numpy as np

from pipeline import finetune, heads, results
from pipeline.backbones.model_file import name_for
from pipeline.config import Config
from pipeline.data import from_config, nested_subset
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
MIN_PER_CLASS = 2


def sizes(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> dict[float, int]:
    """Fraction -> the number of training images its nested subset holds (at least 2 per class)."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise PipelineError(f"--fractions must be in (0, 1], not {', '.join(map(str, bad))}")
    n = len(labels)
    return {f: len(nested_subset(labels, max(1, round(f * n)), seed, MIN_PER_CLASS)) for f in sorted(fractions)}


class _Eta:
    """Time left, from the seconds per training image each kind of work has taken so far (fine-tune epochs
    and head fits both grow about linearly with the training set). Reused points cost next to nothing and
    make it low."""

    def __init__(self):
        self.rate: dict[str, list[float]] = {"heads": [0.0, 0.0], "finetune": [0.0, 0.0]}  # seconds, images
        self.left: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def timing(self, kind: str, n: int):
        t0 = time.perf_counter()
        yield
        self.rate[kind][0] += time.perf_counter() - t0
        self.rate[kind][1] += n

    def text(self) -> str:
        seconds = sum(s / n * sum(self.left.get(kind, ())) for kind, (s, n) in self.rate.items() if n)
        return f" (about {seconds / 60:,.0f} min left at the rates so far)" if seconds else ""


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

    head_cfg, load, streamed = heads.on_subsets(cfg)
    if streamed:
        log.info("notice: %s stream from the cache and are left out of the curve", ", ".join(streamed))
    ft_cfg = copy.deepcopy(cfg)
    ft_cfg.finetune.resume = True  # an interrupted point continues from its last epoch (same inputs only)
    eta = _Eta()
    for k, n in enumerate(points):
        log.info("curve point %d of %d: %d of %d training images%s", k + 1, len(points), n, n_full, eta.text())
        if head_cfg.heads.heads:
            with eta.timing("heads", n):
                heads.run(head_cfg, n_subset=n if n < n_full else None, load=load)
        if n in ft_points:
            with eta.timing("finetune", n):
                finetune.run(ft_cfg, ds, n_subset=n if n < n_full else None)
        eta.left = {"heads": [m for m in points[k + 1 :]], "finetune": [m for m in ft_points if m > n]}
    table = results.read_results(results.results_path(cfg.artifacts, cfg.dataset_name))
    base = table["backbone"].astype(str).str.split("@").str[0]  # the fine-tune's and its heads' variant
    mine = table[(base == name_for(cfg.backbone.backbone)) & table["n_train"].isin(points)]
    mine = mine[mine["features"] == "image"].sort_values(["method", "layers", "n_train"])
    print("\nlearning curve (test accuracy by training images):")
    wide = mine.pivot_table(index=["method", "layers"], columns="n_train", values="test_accuracy")
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    return points
