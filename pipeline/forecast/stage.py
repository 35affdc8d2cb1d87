"""`make forecast`: before paying for the full fine-tune, what it would reach, cost and when it pays.

Measures the cheap evidence (the heads at every ladder size and the full size; the fine-tune, today's full
recipe, at a few small nested sizes, the smallest with several training seeds), then forecasts the
fine-tune at the full size and at twice it, writes the forecast rows, and prints the answer in a sentence.
Points already in the results are reused and an interrupted fine-tune resumes, as for `make curve`. With
``--finetune-budget`` it then runs the full fine-tune only when its forecast cost is within the budget.
"""

from __future__ import annotations

import copy
import logging
import math
import re

from pipeline import finetune, heads, results
from pipeline.backbones.model_file import name_for
from pipeline.config import Config
from pipeline.data import Dataset, from_config, nested_subset
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.forecast import calibration, decide, record
from pipeline.forecast.evidence import gather
from pipeline.forecast.text import budget_text, sentence

log = logging.getLogger(__name__)
MIN_PER_CLASS = 2
MIN_SIZES = 3


def ladder(n_full: int, n_classes: int, sizes: tuple[int, ...], points: int, top: float) -> list[int]:
    """The fine-tune's sizes: given, or ``points`` sizes doubling up to ``top`` of the training split."""
    if not sizes:
        if not 0 < top < 1:
            raise PipelineError(f"--ladder-top must be in (0, 1), not {top}")
        sizes = tuple(round(n_full * top / 2**k) for k in reversed(range(points)))
        if sizes[0] < MIN_PER_CLASS * n_classes:
            raise PipelineError(
                f"{n_full} training images are too few to forecast (its ladder would start at {sizes[0]}, under "
                f"{MIN_PER_CLASS} per class): fine-tune them directly with `make finetune`"
            )
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if len(sizes) < MIN_SIZES:
        raise PipelineError(f"--ladder needs at least {MIN_SIZES} sizes, not {len(sizes)}: e.g. --ladder 150 300 600")
    if sizes[0] < MIN_PER_CLASS * n_classes:
        raise PipelineError(
            f"--ladder size {sizes[0]} is under {MIN_PER_CLASS} images per class ({n_classes} classes): "
            f"start at {MIN_PER_CLASS * n_classes} or more"
        )
    if sizes[-1] >= n_full:
        raise PipelineError(
            f"--ladder size {sizes[-1]} is not below the {n_full} training images: a forecast extrapolates from "
            f"smaller subsets (e.g. up to {n_full // 5})"
        )
    return list(sizes)


def seconds(text: str) -> float:
    """A duration in hours, minutes or seconds (``1h``, ``30m``, ``2.5h``), or a number of seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([hms]?)\s*", str(text))
    if not m:
        raise PipelineError(f"--finetune-budget {text!r} is not a duration: use e.g. 30m, 1h or 2.5h")
    return float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]


def _measure(cfg: Config, ds: Dataset, sizes: list[int], n_full: int) -> list[int]:
    """The heads at every size and the full one, the fine-tune at ``sizes``; returns the subsets' true sizes."""
    labels = ds.splits["train"].labels
    actual = [len(nested_subset(labels, n, cfg.data.seed, MIN_PER_CLASS)) for n in sizes]
    head_cfg, load, _ = heads.on_subsets(cfg)
    for n in [*actual, n_full]:
        heads.run(head_cfg, n_subset=n if n < n_full else None, load=load)
    ft_cfg = copy.deepcopy(cfg)
    ft_cfg.finetune.resume = True
    for k, n in enumerate(actual):
        ft_cfg.finetune.seeds = cfg.forecast.ladder_seeds if k == 0 else 1
        log.info("forecast: fine-tune %d of %d at %d of %d training images", k + 1, len(actual), n, n_full)
        finetune.run(ft_cfg, ds, n_subset=n)
    return actual


def run(cfg: Config) -> list[record.Forecast]:
    fc = cfg.forecast
    budget = seconds(fc.finetune_budget) if fc.finetune_budget else None
    if fc.ladder_seeds < 2:
        raise PipelineError("--ladder-seeds must be at least 2: the seed-to-seed noise is measured, not assumed")
    ds = from_config(cfg)
    n_full = len(ds.splits["train"])
    try:
        sizes = ladder(n_full, len(ds.class_names), fc.ladder, fc.ladder_points, fc.ladder_top)
    except PipelineError as e:
        if budget is None or fc.ladder:
            raise
        log.info("notice: %s; running the full fine-tune", e)
        finetune.run(cfg, ds)
        return []
    sizes = _measure(cfg, ds, sizes, n_full)
    backbone = name_for(cfg.backbone.backbone)
    table = results.read_results(results.results_path(cfg.artifacts, cfg.dataset_name))
    ev = gather(table, backbone, extract.cache_path(cfg).stem, sizes, n_full)
    cases = calibration.read_cases()
    curves = decide.build(ev, cases, 2 * n_full)
    kw = dict(dataset=cfg.dataset_name, backbone=backbone, n_full=n_full, max_epochs=cfg.finetune.epochs_finetune)
    records = [decide.at(curves, target=t, **kw) for t in (n_full, 2 * n_full)]
    record.write(record.path(cfg.artifacts, cfg.dataset_name), records)
    record.write_band(record.band_path(cfg.artifacts, cfg.dataset_name), backbone, decide.band(curves))
    print("\n" + sentence(records[0], records[1], sizes))
    if budget is not None and math.isnan(records[0].measured_accuracy):
        if records[0].cost_seconds <= budget:
            log.info("forecast cost of the full fine-tune within --finetune-budget: running it")
            finetune.run(cfg, ds)
        else:
            print(budget_text(records[0], budget, cfg))
    return records
