"""Fitting one head: tuned on the validation split (stratified CV on train when there is none), refitted
if asked, scored once on test; tuning and the final fit timed apart."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass

import joblib
import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold
from sklearn.pipeline import Pipeline

from pipeline import results
from pipeline.data import stratified_split
from pipeline.errors import PipelineError
from pipeline.estimators import tuning
from pipeline.extract.cache.reader import SplitData
from pipeline.heads import registry
from pipeline.heads.compose import make_pipeline

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HeadResult:
    head: str
    features: str
    params: dict
    val_accuracy: float
    scores: dict
    tune_seconds: float
    fit_seconds: float
    n_train: int
    test_pred: np.ndarray
    layers: str = "last"  # the layer set's label: last, all, auto or the names
    layer_names: list[str] = dataclasses.field(default_factory=lambda: ["last"])


def _subsample(d: SplitData, n: int, seed: int) -> SplitData:
    _, keep = stratified_split(d.y, [n / len(d.y)], seed)
    return d.take(keep)


def _param_name(key: str) -> str:
    return "meta_weight" if key.endswith("meta__weight__weight") else key.removeprefix("clf__")


def _accuracy(clf, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(clf.predict(X) == y))


def _tune_on_val(pipe: Pipeline, grid: dict, train: SplitData, val: SplitData, desc: str | None = None):
    """Tune on the validation split: the preprocessing fitted once per setting of its own grid (the
    metadata weight) and applied into one scaled copy, then the classifier's own ``tune`` (every value
    of its grid in one go) or a coarse-to-fine, warm-started ``path_search`` over C.

    Returns (best pipeline fitted on train, params, val accuracy, seconds fitting the kept model)."""
    if not len(val.y):
        raise PipelineError(f"{pipe[-1].__class__.__name__} heads are tuned on the validation split; this has none")
    pre_grid = {k: v for k, v in grid.items() if not k.startswith("clf__")}
    clf_grid = {k.removeprefix("clf__"): v for k, v in grid.items() if k.startswith("clf__")}
    best = None
    for pre_params in ParameterGrid(pre_grid):
        pre = tuning.fit_scalers(clone(pipe[:-1]).set_params(**pre_params), train.X)
        ab = tuning.affine(pre, train.X.shape[1])
        if ab is not None and all(X.dtype == np.float32 for X in (train.X, val.X)):
            Xt, Xv = tuning.transformed(train.X, *ab), tuning.transformed(val.X, *ab)
        else:
            Xt, Xv = pre.transform(train.X), pre.transform(val.X)
        clf = clone(pipe[-1])
        if hasattr(clf, "tune"):
            params, acc, fit_seconds = clf.tune(Xt, train.y, Xv, val.y, clf_grid, desc=desc)
        else:
            ((name, values),) = clf_grid.items()

            def fit_score(v, clf=clf, name=name, Xt=Xt, Xv=Xv):
                clf.set_params(**{name: v}).fit(Xt, train.y)
                return _accuracy(clf, Xv, val.y)

            value, acc, _, clf, fit_seconds = tuning.path_search(fit_score, clf, values, name, desc)
            params = {name: value}
        del Xt, Xv  # before the next setting's copy
        if best is None or acc > best[2]:
            fitted = Pipeline([*pre.steps, ("clf", clf)])
            best = (fitted, {**pre_params, **{f"clf__{k}": v for k, v in params.items()}}, acc, fit_seconds)
    return best


def _tune_cv(pipe: Pipeline, grid: dict, train: SplitData, seed: int, n_jobs: int) -> tuple[dict, float]:
    """No validation split: stratified 3-fold cross-validation on train, in threads (no worker copies)."""
    cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    search = GridSearchCV(pipe, grid, cv=cv, scoring="accuracy", refit=False, n_jobs=n_jobs)
    with joblib.parallel_config(backend="threading"):
        search.fit(train.X, train.y)
    return search.best_params_, float(search.best_score_)


def fit_head(
    head: str,
    features: str,
    splits: dict[str, SplitData],
    dim: int | list[int],
    h,
    seed: int,
    ref: int | None = None,
    desc: str | None = None,
) -> tuple[Pipeline, HeadResult]:
    """Tune C (or alpha, k, dropout; and the metadata weight) on val, refit if asked, score on test;
    each step timed.

    ``dim`` is the image feature width, or the widths of its blocks (layers) in order; ``h``: the heads
    settings (grids, solver limits, refit)."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    cap_setting = registry.get(head).max_train_setting
    cap = getattr(h, cap_setting) if cap_setting else None
    if cap is not None and len(train.y) > cap:
        log.warning(
            "notice: %s is O(N^2); training on a stratified subsample of %d of %d images (--%s)",
            head,
            cap,
            len(train.y),
            cap_setting.replace("_", "-"),
        )
        train = _subsample(train, cap, seed)
    if len(val.y) and len(np.unique(val.y)) < 2:
        log.warning(
            "warning: the validation split holds a single class: every setting of %s scores the same on it, so "
            "tuning picks arbitrarily (add images to the other classes' val, or use a larger --val-fraction)",
            head,
        )
    n_meta = train.X.shape[1] - (dim if isinstance(dim, int) else sum(dim))
    pipe, grid = make_pipeline(head, features, dim, n_meta, h, seed, ref, n=len(train.y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        if len(val.y):
            best, best_params, val_acc, fit_seconds = _tune_on_val(pipe, grid, train, val, desc)
            n_fit = len(train.y)
        else:
            if registry.get(head).val_tuned_only:
                raise PipelineError(f"{head} heads are tuned on the validation split; this dataset has none")
            best_params, val_acc = _tune_cv(pipe, grid, train, seed, h.n_jobs)
            best, fit_seconds, n_fit = None, 0.0, 0
        tune_seconds = time.perf_counter() - t0 - fit_seconds
        if best is None or h.refit == "train+val":
            X_fit, y_fit = train.X, train.y
            if h.refit == "train+val" and len(val.y):
                X_fit, y_fit = np.vstack([train.X, val.X]), np.concatenate([train.y, val.y])
            best = clone(pipe).set_params(**best_params)
            t0 = time.perf_counter()
            best.fit(X_fit, y_fit)
            fit_seconds, n_fit = time.perf_counter() - t0, len(y_fit)
    pred = best.predict(test.X)
    params = {_param_name(k): v for k, v in best_params.items()}
    res = HeadResult(
        head=head,
        features=features,
        params=params,
        val_accuracy=val_acc,
        scores=results.scores(test.y, pred),
        tune_seconds=tune_seconds,
        fit_seconds=fit_seconds,
        n_train=n_fit,
        test_pred=pred,
    )
    return best, res
