"""`make svm`: tuned, timed scikit-learn heads on cached embeddings (+ metadata).

Linear-probe protocol: standardise, sweep C on a log grid, pick it on the
validation split (stratified CV on train when there is none), refit, evaluate
once on test. Tuning and the final fit are timed separately; the cache's
extraction time is carried along so the report can charge it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from pipeline import results
from pipeline.config import Config, atomic_path, run_record, writable_dir, write_json_atomic
from pipeline.data import stratified_split
from pipeline.errors import PipelineError
from pipeline.extract import cache_path
from pipeline.features import FeatureSet, SplitData, fuse, load_features, metadata_table
from pipeline.results import head_name

log = logging.getLogger(__name__)

FEATURE_SETS = ("image", "image+meta", "image+meta_norm")


class BlockWeight(BaseEstimator, TransformerMixin):
    """Scale a standardised block so its total variance is ``weight`` x that of another block.

    A handful of metadata columns next to 1,280 embedding dimensions would be
    drowned out; scaling by sqrt(n_other / n_block) gives them equal say at
    weight 1, and the weight is tuned like C.
    """

    def __init__(self, weight: float = 1.0, n_other: int = 1):
        self.weight = weight
        self.n_other = n_other

    def fit(self, X, y=None):
        self.factor_ = self.weight * np.sqrt(self.n_other / max(X.shape[1], 1))
        return self

    def transform(self, X):
        return np.asarray(X, dtype=np.float64) * self.factor_


def make_classifier(head: str, cfg: Config, seed: int):
    h = cfg.heads
    if head == "linear_svm":
        # The dual solver is bounded by max_iter at large C; the primal one took 100 s+ per fit
        # there on 3,000 x 1,280 embeddings (measured), for the same validation accuracy.
        return LinearSVC(dual=True, max_iter=h.max_iter, random_state=seed)
    if head == "rbf_svm":
        return SVC(kernel="rbf", gamma="scale", cache_size=1000, random_state=seed)
    if head == "logreg":
        return LogisticRegression(solver="lbfgs", max_iter=h.max_iter)
    raise PipelineError(f"unknown head '{head}' (known: linear_svm, rbf_svm, logreg)")


def make_pipeline(head: str, features: str, dim: int, n_meta: int, cfg: Config, seed: int) -> tuple[Pipeline, dict]:
    """The estimator and its grid; embeddings are always standardised inside the pipeline."""
    clf = make_classifier(head, cfg, seed)
    grid = {"clf__C": list(cfg.heads.c_grid)}
    if features == "image":
        return Pipeline([("scale", StandardScaler()), ("clf", clf)]), grid
    image = ("image", StandardScaler(), slice(0, dim))
    if features == "image+meta":
        meta = ("meta", "passthrough", slice(dim, dim + n_meta))
    else:
        meta = (
            "meta",
            Pipeline([("scale", StandardScaler()), ("weight", BlockWeight(1.0, dim))]),
            slice(dim, dim + n_meta),
        )
        grid["blocks__meta__weight__weight"] = list(cfg.heads.meta_weights)
    return Pipeline([("blocks", ColumnTransformer([image, meta])), ("clf", clf)]), grid


@dataclass
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


def _subsample(d: SplitData, n: int, seed: int) -> SplitData:
    _, keep = stratified_split(d.y, [n / len(d.y)], seed)
    return d.take(keep)


def fit_head(
    head: str, features: str, splits: dict[str, SplitData], dim: int, cfg: Config
) -> tuple[Pipeline, HeadResult]:
    """Tune C (and the metadata weight) on val, refit, score on test; each step timed."""
    seed = cfg.data.seed
    train, val, test = splits["train"], splits["val"], splits["test"]
    if head == "rbf_svm" and len(train.y) > cfg.heads.rbf_max_train:
        log.warning(
            "notice: rbf_svm is O(N^2); training on a stratified subsample of %d of %d images (--rbf-max-train)",
            cfg.heads.rbf_max_train,
            len(train.y),
        )
        train = _subsample(train, cfg.heads.rbf_max_train, seed)
    n_meta = train.X.shape[1] - dim
    pipe, grid = make_pipeline(head, features, dim, n_meta, cfg, seed)
    if len(val.y):
        X_tune = np.vstack([train.X, val.X])
        y_tune = np.concatenate([train.y, val.y])
        cv = PredefinedSplit(np.r_[np.full(len(train.y), -1), np.zeros(len(val.y))])
    else:
        X_tune, y_tune = train.X, train.y
        cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    search = GridSearchCV(pipe, grid, cv=cv, scoring="accuracy", refit=False, n_jobs=cfg.heads.n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        search.fit(X_tune, y_tune)
        tune_seconds = time.perf_counter() - t0
        best = clone(pipe).set_params(**search.best_params_)
        X_fit, y_fit = (X_tune, y_tune) if cfg.heads.refit == "train+val" else (train.X, train.y)
        t0 = time.perf_counter()
        best.fit(X_fit, y_fit)
        fit_seconds = time.perf_counter() - t0
    pred = best.predict(test.X)
    params = {"C" if k == "clf__C" else "meta_weight": v for k, v in search.best_params_.items()}
    res = HeadResult(
        head,
        features,
        params,
        float(search.best_score_),
        results.scores(test.y, pred),
        tune_seconds,
        fit_seconds,
        len(y_fit),
        pred,
    )
    return best, res


def run(cfg: Config) -> list[HeadResult]:
    """Fit every configured head on every applicable feature set; save, score, record."""
    if cfg.heads.refit not in ("train", "train+val"):
        raise PipelineError(f"--refit must be 'train' or 'train+val', not {cfg.heads.refit}")
    unknown = [f for f in cfg.heads.features if f not in FEATURE_SETS]
    if unknown:
        raise PipelineError(f"unknown feature set(s) {', '.join(unknown)} (known: {', '.join(FEATURE_SETS)})")
    fs = load_features(cache_path(cfg), cfg.backbone.backbone)
    dataset = cfg.dataset_name
    out_dir = writable_dir(Path(cfg.artifacts) / "heads" / dataset / fs.backbone)
    res_path = results.results_path(cfg.artifacts, dataset)

    variants: dict[str, tuple[dict[str, SplitData], list[str]]] = {}
    if "image" in cfg.heads.features:
        variants["image"] = (fs.splits, [])
    meta_sets = [f for f in cfg.heads.features if f != "image"]
    if meta_sets:
        if cfg.metadata_path is None:
            log.info("no metadata for %s: fitting image-only heads", dataset)
        else:
            meta = metadata_table(cfg.metadata_path, fs, cfg.heads.meta_columns, cfg.data.id_column)
            fused = fuse(fs, meta, cfg.heads.metadata_missing)
            log.info("metadata: %d columns after encoding (%s)", len(fused[1]), ", ".join(fused[1][:8]))
            for f in meta_sets:
                variants[f] = fused

    out: list[HeadResult] = []
    for features, (splits, meta_names) in variants.items():
        for head in cfg.heads.heads:
            name = head_name(head, features)
            log.info(
                "fitting %s on %s (%d train, %d-dim)",
                name,
                fs.backbone,
                len(splits["train"].y),
                splits["train"].X.shape[1],
            )
            model, r = fit_head(head, features, splits, fs.embedding_dim, cfg)
            _save(out_dir / name, model, r, fs, cfg, meta_names)
            results.write_predictions(
                out_dir / f"{name}.predictions.csv",
                splits["test"].ids,
                splits["test"].y,
                r.test_pred,
                fs.class_names,
            )
            results.upsert(
                res_path,
                {
                    "dataset": dataset,
                    "backbone": fs.backbone,
                    "method": head,
                    "features": features,
                    "val_accuracy": r.val_accuracy,
                    **r.scores,
                    "train_seconds": r.tune_seconds + r.fit_seconds,
                    "tune_seconds": r.tune_seconds,
                    "fit_seconds": r.fit_seconds,
                    "extract_seconds": fs.extract_seconds,
                    "n_train": r.n_train,
                    "n_test": len(splits["test"].y),
                    "params": json.dumps(r.params),
                    "weights": fs.attrs.get("weights", ""),
                },
            )
            log.info(
                "  %-24s val %.4f  test %.4f  C=%g  tune %.1fs + fit %.1fs",
                name,
                r.val_accuracy,
                r.scores["test_accuracy"],
                r.params["C"],
                r.tune_seconds,
                r.fit_seconds,
            )
            out.append(r)
    _print_table(out, fs.backbone, res_path)
    return out


def _save(stem: Path, model: Pipeline, r: HeadResult, fs: FeatureSet, cfg: Config, meta_names: list[str]) -> None:
    """joblib model + JSON sidecar (what scikit-learn's persistence guide asks to keep beside it)."""
    with atomic_path(stem.with_name(stem.name + ".joblib")) as tmp:
        joblib.dump(model, tmp)
    write_json_atomic(
        stem.with_name(stem.name + ".json"),
        run_record(
            cfg,
            "heads",
            head=r.head,
            features=r.features,
            params=r.params,
            val_accuracy=r.val_accuracy,
            scores=r.scores,
            tune_seconds=r.tune_seconds,
            fit_seconds=r.fit_seconds,
            n_train=r.n_train,
            metadata_columns=meta_names,
            class_names=fs.class_names,
            cache={
                "path": str(fs.path),
                "dataset_fingerprint": fs.attrs.get("dataset_fingerprint"),
                "weights": fs.attrs.get("weights"),
                "extract_seconds": fs.extract_seconds,
            },
        ),
    )


def _print_table(rows: list[HeadResult], backbone: str, res_path: Path) -> None:
    print(f"\n{'head':28s} {'features':16s} {'C':>8s} {'val acc':>8s} {'test acc':>9s} {'train s':>8s}")
    for r in rows:
        print(
            f"{head_name(r.head, r.features):28s} {r.features:16s} {r.params['C']:8g} {r.val_accuracy:8.4f} "
            f"{r.scores['test_accuracy']:9.4f} {r.tune_seconds + r.fit_seconds:8.1f}"
        )
    print(f"({backbone}; results in {res_path})")
