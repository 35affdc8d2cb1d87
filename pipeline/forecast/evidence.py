"""What a forecast rests on, read from the results table: the small fine-tunes (their accuracies, seeds and
costs) and the heads' measured curve. Only rows of the same backbone, on image features or the best head's
own features, at the ladder's sizes and the full size."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.finetune.record import FinetuneParams
from pipeline.forecast.cost import Run
from pipeline.forecast.curves import Points
from pipeline.results import FINETUNED, head_name


@dataclass(frozen=True)
class Evidence:
    finetune: Points  # the fine-tune's test accuracy at each ladder size, one observation per seed
    seed_sd: float  # pooled training-seed spread at the sizes run with several seeds
    seed_n: float  # the size it was measured at (their geometric mean when several)
    n_test: int
    runs: list[Run]
    head: str  # the best head by validation at the full size
    head_curve: Points  # its measured test accuracy by size, the full size included
    forecast_seconds: float  # the small fine-tunes and the heads' subsets
    measured_full: float  # the fine-tune at the full size when one was run, else NaN


def seed_noise(n: np.ndarray, acc: np.ndarray) -> tuple[float, float]:
    """Pooled sample sd of test accuracy across training seeds at the sizes that have several, and the
    (geometric mean) size it was measured at; NaN when no size has two seeds."""
    groups = [(s, acc[n == s]) for s in np.unique(n) if (n == s).sum() > 1]
    if not groups:
        return float("nan"), float("nan")
    dof = sum(len(g) - 1 for _, g in groups)
    sd = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for _, g in groups) / dof))
    return sd, float(np.exp(np.mean([np.log(s) for s, _ in groups])))


def seed_sd_at(n, seed_sd: float, seed_n: float):
    """The seed spread at ``n``: its variance shrinks as 1/n, as a mean over the training images does (the
    variance model v0 + v1/n of Hoiem et al., with v0 left to the test set's own binomial noise)."""
    return seed_sd * np.sqrt(seed_n / np.asarray(n, dtype=float))


def _run(row: pd.Series) -> Run:
    p = FinetuneParams.from_params(json.loads(row["params"]) if isinstance(row["params"], str) else {})
    phase, epochs = p.phase_seconds or [0.0, 0.0], p.epochs_run or [0, 1]
    return Run(int(row["n_train"]), float(phase[0]), float(row["tune_seconds"] or 0), float(phase[1]), int(epochs[1]))


def _binomial_sd(acc: np.ndarray, n_test: np.ndarray) -> np.ndarray:
    return np.sqrt(acc * (1 - acc) / np.maximum(n_test, 1))


def gather(table: pd.DataFrame, backbone: str, cache: str, sizes: list[int], n_full: int) -> Evidence:
    """The evidence at ``sizes`` (the ladder) and ``n_full``: the fine-tunes of ``backbone`` and the heads on
    its cache variant ``cache`` (e.g. ``efficientnet_lite0@112px``); a missing point is a one-line error."""
    mine = table[table["backbone"].astype(str) == backbone]
    ft = mine[(mine["method"] == "finetune") & mine["n_train"].isin(sizes)]
    missing = sorted(set(sizes) - set(ft["n_train"].astype(int)))
    if missing:
        raise PipelineError(f"no fine-tune at {missing} images in the results: rerun `make forecast` to train them")
    acc, n_test, n = ft["test_accuracy"].to_numpy(float), ft["n_test"].to_numpy(float), ft["n_train"].to_numpy(float)
    seed_sd, seed_n = seed_noise(n, acc)
    if not np.isfinite(seed_sd):
        raise PipelineError("no size was fine-tuned with two training seeds: rerun with --ladder-seeds 2")
    sd = np.sqrt(_binomial_sd(acc, n_test) ** 2 + seed_sd_at(n, seed_sd, seed_n) ** 2)
    on_cache = table[table["backbone"].astype(str) == cache]
    heads = on_cache[~on_cache["method"].isin(FINETUNED) & on_cache["seed"].isna()]
    full = heads[heads["n_train"] == n_full]
    if full.empty:
        raise PipelineError(f"no head fitted on all {n_full} training images: run `make svm` first")
    best = full.sort_values(["val_accuracy", "test_accuracy"], ascending=False).iloc[0]
    same = heads[(heads["method"] == best["method"]) & (heads["layers"] == best["layers"])]
    same = same[(same["features"] == best["features"]) & same["n_train"].isin([*sizes, n_full])]
    h_acc, h_n = same["test_accuracy"].to_numpy(float), same["n_test"].to_numpy(float)
    measured = mine[(mine["method"] == "finetune") & (mine["n_train"] == n_full) & mine["seed"].isna()]
    spent = ft["train_seconds"].sum() + heads[heads["n_train"].isin(sizes)]["train_seconds"].sum()
    return Evidence(
        finetune=Points(n, acc, sd),
        seed_sd=seed_sd,
        seed_n=seed_n,
        n_test=int(np.median(n_test)),
        runs=[_run(r) for _, r in ft.iterrows()],
        head=head_name(str(best["method"]), str(best["features"]), str(best["layers"])),
        head_curve=Points(same["n_train"].to_numpy(float), h_acc, _binomial_sd(h_acc, h_n)),
        forecast_seconds=float(spent),
        measured_full=float(measured["test_accuracy"].iloc[0]) if len(measured) else float("nan"),
    )
