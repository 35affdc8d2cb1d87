"""`make svm`: tuned, timed scikit-learn heads on cached embeddings (+ metadata).

Linear-probe protocol: standardise, tune C (alpha, k, ...) on the validation
split (stratified CV on train when there is none), evaluate once on test.
Tuning and the final fit are timed; the cache's extraction time is carried
along so the report can charge it.

Each head runs per layer set (``--layers``, see ``pipeline.layer_select``) and
feature set. The preprocessing is fitted once per feature set and applied in
place; heads with a ``tune`` method (``pipeline.linear``, ``pipeline.estimators``)
cover their whole grid in one go, scikit-learn's exact solvers walk a
coarse-to-fine, warm-started C path (``pipeline.tuning``). ``linear_probe``
(``pipeline.probe``) streams from the cache; the others check the memory budget
(``pipeline.budget``) before loading it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline import budget, layer_select, results, tuning, uptodate
from pipeline.backbones.model_file import name_for
from pipeline.config import Config, atomic_path, run_record, writable_dir, write_json_atomic
from pipeline.data import nested_subset, stratified_split
from pipeline.errors import PipelineError
from pipeline.estimators import CosineKNN, KerasMLP, KernelSVC
from pipeline.extract import KEY_FIELDS, cache_path
from pipeline.features import (
    CacheInfo,
    FeatureSet,
    MetaEncoding,
    SplitData,
    check_cache,
    fuse,
    load_features,
    metadata_table,
    train_labels,
)
from pipeline.linear import LinearHead, RidgeHead
from pipeline.results import head_name

log = logging.getLogger(__name__)

FEATURE_SETS = ("image", "image+meta", "image+meta_norm")
HEADS = results.IN_MEMORY_HEADS
STREAMING = results.STREAMING_HEADS
VAL_TUNED = ("mlp", "knn")  # tuned by their own ``tune`` on the validation split
FLOATS = (np.float64, np.float32)  # BlockWeight keeps either dtype as it comes


class BlockWeight(TransformerMixin, BaseEstimator):
    """Scale a standardised block so its total variance is ``weight`` x that of another block.

    A handful of metadata columns next to 1,280 embedding dimensions would be
    drowned out; scaling by sqrt(n_other / n_block) gives them equal say at
    weight 1, and the weight is tuned like C.
    """

    def __init__(self, weight: float = 1.0, n_other: int = 1):
        self.weight = weight
        self.n_other = n_other

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=FLOATS, reset=True)
        self.factor_ = self.weight * np.sqrt(self.n_other / max(X.shape[1], 1))
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOATS, reset=False)
        return X * np.asarray(self.factor_, dtype=X.dtype)


def make_classifier(head: str, cfg: Config, seed: int, n: int = 0, d: int = 0):
    """The classifier, its solver chosen by the training matrix's size (n images x d features)."""
    h = cfg.heads
    large = n * d > h.exact_max_size
    if head == "ridge":
        return RidgeHead()
    if head == "linear_svm":
        if large:
            return LinearHead("squared_hinge", batch_size=h.batch_size, seed=seed)
        # liblinear's dual solver when there are fewer images than features, the primal one otherwise
        return LinearSVC(dual=bool(n < d), max_iter=h.max_iter, random_state=seed)
    if head == "rbf_svm":
        return KernelSVC()
    if head == "logreg":
        if large:
            return LinearHead("log", batch_size=h.batch_size, seed=seed)
        return LogisticRegression(solver="lbfgs", max_iter=h.max_iter, warm_start=True)
    if head == "knn":
        return CosineKNN()
    if head == "mlp":
        return KerasMLP(hidden=h.mlp_hidden, seed=seed)
    raise PipelineError(f"unknown head '{head}' (known: {', '.join(HEADS)})")


def _grid(head: str, cfg: Config) -> dict:
    if head == "knn":
        return {"clf__n_neighbors": list(cfg.heads.k_grid)}
    if head == "mlp":
        return {"clf__dropout": list(cfg.heads.mlp_dropout)}
    if head == "ridge":
        return {"clf__alpha": list(cfg.heads.alpha_grid)}
    return {"clf__C": list(cfg.heads.c_grid)}


def make_pipeline(
    head: str,
    features: str,
    dims: int | list[int],
    n_meta: int,
    cfg: Config,
    seed: int,
    ref: int | None = None,
    n: int = 0,
) -> tuple[Pipeline, dict]:
    """The estimator and its grid. Image features are standardised inside the pipeline; with
    several blocks (layers) each is also scaled to ``ref`` dimensions' worth of variance."""
    widths = [dims] if isinstance(dims, int) else list(dims)
    clf = make_classifier(head, cfg, seed, n, sum(widths) + n_meta)
    grid = _grid(head, cfg)
    if features == "image" and len(widths) == 1:
        return Pipeline([("scale", StandardScaler()), ("clf", clf)]), grid
    ref = ref or widths[0]
    blocks, start = [], 0
    for k, w in enumerate(widths):
        if len(widths) == 1:
            blocks.append(("image", StandardScaler(), slice(0, w)))
        else:
            blocks.append(
                (
                    f"layer{k}",
                    Pipeline([("scale", StandardScaler()), ("weight", BlockWeight(1.0, ref))]),
                    slice(start, start + w),
                )
            )
        start += w
    dim = start
    image_variance = dim if len(widths) == 1 else ref * len(widths)
    if features == "image+meta":
        blocks.append(("meta", "passthrough", slice(dim, dim + n_meta)))
    elif features == "image+meta_norm":
        blocks.append(
            (
                "meta",
                Pipeline([("scale", StandardScaler()), ("weight", BlockWeight(1.0, image_variance))]),
                slice(dim, dim + n_meta),
            )
        )
        grid["blocks__meta__weight__weight"] = list(cfg.heads.meta_weights)
    return Pipeline([("blocks", ColumnTransformer(blocks)), ("clf", clf)]), grid


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
    from sklearn.model_selection import ParameterGrid

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


def _tune_cv(pipe: Pipeline, grid: dict, train: SplitData, cfg: Config) -> tuple[dict, float]:
    """No validation split: stratified 3-fold cross-validation on train, in threads (no worker copies)."""
    cv = StratifiedKFold(3, shuffle=True, random_state=cfg.data.seed)
    search = GridSearchCV(pipe, grid, cv=cv, scoring="accuracy", refit=False, n_jobs=cfg.heads.n_jobs)
    with joblib.parallel_config(backend="threading"):
        search.fit(train.X, train.y)
    return search.best_params_, float(search.best_score_)


def fit_head(
    head: str,
    features: str,
    splits: dict[str, SplitData],
    dim: int | list[int],
    cfg: Config,
    ref: int | None = None,
    desc: str | None = None,
) -> tuple[Pipeline, HeadResult]:
    """Tune C (or alpha, k, dropout; and the metadata weight) on val, refit if asked, score on test;
    each step timed.

    ``dim`` is the image feature width, or the widths of its blocks (layers) in order."""
    seed = cfg.data.seed
    train, val, test = splits["train"], splits["val"], splits["test"]
    if head == "rbf_svm" and len(train.y) > cfg.heads.rbf_max_train:
        log.warning(
            "notice: rbf_svm is O(N^2); training on a stratified subsample of %d of %d images (--rbf-max-train)",
            cfg.heads.rbf_max_train,
            len(train.y),
        )
        train = _subsample(train, cfg.heads.rbf_max_train, seed)
    if len(val.y) and len(np.unique(val.y)) < 2:
        log.warning(
            "warning: the validation split holds a single class: every setting of %s scores the same on it, so "
            "tuning picks arbitrarily (add images to the other classes' val, or use a larger --val-fraction)",
            head,
        )
    n_meta = train.X.shape[1] - (dim if isinstance(dim, int) else sum(dim))
    pipe, grid = make_pipeline(head, features, dim, n_meta, cfg, seed, ref, n=len(train.y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        if len(val.y):
            best, best_params, val_acc, fit_seconds = _tune_on_val(pipe, grid, train, val, desc)
            n_fit = len(train.y)
        else:
            if head in VAL_TUNED:
                raise PipelineError(f"{head} heads are tuned on the validation split; this dataset has none")
            best_params, val_acc = _tune_cv(pipe, grid, train, cfg)
            best, fit_seconds, n_fit = None, 0.0, 0
        tune_seconds = time.perf_counter() - t0 - fit_seconds
        if best is None or cfg.heads.refit == "train+val":
            X_fit, y_fit = train.X, train.y
            if cfg.heads.refit == "train+val" and len(val.y):
                X_fit, y_fit = np.vstack([train.X, val.X]), np.concatenate([train.y, val.y])
            best = clone(pipe).set_params(**best_params)
            t0 = time.perf_counter()
            best.fit(X_fit, y_fit)
            fit_seconds, n_fit = time.perf_counter() - t0, len(y_fit)
    pred = best.predict(test.X)
    params = {_param_name(k): v for k, v in best_params.items()}
    res = HeadResult(
        head, features, params, val_acc, results.scores(test.y, pred), tune_seconds, fit_seconds, n_fit, pred
    )
    return best, res


HEAD_SETTINGS = {  # the heads options each head's numbers depend on (for the up-to-date check)
    "ridge": ("alpha_grid",),
    "logreg": ("c_grid", "exact_max_size", "batch_size", "max_iter"),
    "linear_svm": ("c_grid", "exact_max_size", "batch_size", "max_iter"),
    "rbf_svm": ("c_grid", "rbf_max_train"),
    "mlp": ("mlp_hidden", "mlp_dropout"),
    "knn": ("k_grid",),
    "linear_probe": ("probe_decays", "probe_epochs", "batch_size"),
}


@dataclass
class _Planned:
    """One (head, feature set, layer set) to fit, or reuse when its inputs key matches."""

    head: str
    features: str
    label: str
    layers: list[str] | None  # None: chosen by --layers auto
    name: str  # artifact stem, with the learning-curve suffix
    key: str


def _plan(cfg: Config, attrs: dict, names: list[str], n_subset: int | None) -> list[_Planned]:
    h = cfg.heads
    meta_on = cfg.metadata_path is not None
    if not meta_on and any(f != "image" for f in h.features):
        log.info("no metadata for %s: fitting image-only heads", cfg.dataset_name)
    features = [f for f in h.features if f == "image" or meta_on]
    digest = uptodate.file_digest(cfg.metadata_path) if meta_on and len(features) > ("image" in features) else None
    # a cache from before precision was keyed leaves it out, so its heads keep their inputs keys
    cache = {k: attrs.get(k) for k in KEY_FIELDS if k != "precision" or k in attrs}
    plan = []
    for label, layers in layer_select.variants(h.layers, names):
        for f in features:
            for head in h.heads:
                if head in STREAMING and (f != "image" or layers is None):
                    continue
                settings = {k: getattr(h, k) for k in HEAD_SETTINGS[head] + ("refit", "train_views")}
                if f != "image":
                    settings.update(metadata=digest, columns=h.meta_columns, missing=h.metadata_missing)
                    settings.update(id_column=cfg.data.id_column, weights=h.meta_weights if f.endswith("norm") else 0)
                key = uptodate.inputs_key(
                    stage="heads",
                    cache=cache,
                    head=head,
                    features=f,
                    layers=[label, layers],
                    settings=settings,
                    seed=cfg.data.seed,
                    n_subset=n_subset,
                )
                name = head_name(head, f, label) + results.subset_suffix(n_subset)
                plan.append(_Planned(head, f, label, layers, name, key))
    return plan


def run(cfg: Config, n_subset: int | None = None, load: Callable[[], FeatureSet] | None = None) -> list[HeadResult]:
    """Fit every configured head on every layer set and applicable feature set; save, score, record.

    ``n_subset``: fit on a nested stratified subset of that many training images (learning curve);
    its artifacts get a ``-n<N>`` suffix. A head whose inputs match a saved result is reused.
    ``load``: returns the cache's features (the curve passes one memo, so its points read the cache once)."""
    if cfg.heads.refit not in ("train", "train+val"):
        raise PipelineError(f"--refit must be 'train' or 'train+val', not {cfg.heads.refit}")
    unknown = [f for f in cfg.heads.features if f not in FEATURE_SETS]
    if unknown:
        raise PipelineError(f"unknown feature set(s) {', '.join(unknown)} (known: {', '.join(FEATURE_SETS)})")
    bad = [h for h in cfg.heads.heads if h not in HEADS + STREAMING]
    if bad:
        raise PipelineError(f"unknown head(s) {', '.join(bad)} (known: {', '.join(HEADS + STREAMING)})")
    path = cache_path(cfg)
    attrs = check_cache(path, name_for(cfg.backbone.backbone))
    info = CacheInfo(path, attrs)
    keep = None  # the training rows of a learning-curve point, drawn once
    if n_subset is not None:
        labels = train_labels(path)
        keep = nested_subset(labels, n_subset, cfg.data.seed) if n_subset < len(labels) else None
        n_subset = None if keep is None else len(keep)
    res_path = results.results_path(cfg.artifacts, cfg.dataset_name)
    out_dir = writable_dir(Path(cfg.artifacts) / "heads" / cfg.dataset_name / info.backbone)
    out: list[HeadResult] = []
    todo: list[_Planned] = []
    for p in _plan(cfg, attrs, info.layer_names(), n_subset):
        model = out_dir / (p.name + (".keras" if p.head in STREAMING else ".joblib"))
        saved = uptodate.reusable(
            out_dir / f"{p.name}.json", p.key, model, out_dir / f"{p.name}.predictions.csv", force=cfg.force
        )
        if saved is None or "row" not in saved:
            todo.append(p)
            continue
        results.upsert(res_path, saved["row"])
        log.info("  %-28s up to date (val %.4f, test %.4f), reused; --force to redo", p.name, *_accs(saved))
        out.append(_from_record(saved))
    in_memory = [p for p in todo if p.head not in STREAMING]
    if in_memory:
        budget.check(
            list(dict.fromkeys(p.head for p in in_memory)), path, cfg, any(p.features != "image" for p in in_memory)
        )
        load = load or (lambda: load_features(path, name_for(cfg.backbone.backbone)))
        out += _run_in_memory(cfg, in_memory, load(), res_path, out_dir, keep)
    streaming = [p for p in todo if p.head in STREAMING]
    if streaming:
        out += _run_streaming(cfg, streaming, info, res_path, out_dir)
    _print_table(out, info.backbone, res_path)
    return out


def _accs(saved: dict) -> tuple[float, float]:
    return saved["val_accuracy"], saved["scores"]["test_accuracy"]


def _from_record(saved: dict) -> HeadResult:
    return HeadResult(
        saved["head"],
        saved["features"],
        saved["params"],
        saved["val_accuracy"],
        saved["scores"],
        saved["tune_seconds"],
        saved["fit_seconds"],
        saved["n_train"],
        None,
        saved["layers"],
        saved["layer_names"],
    )


def _run_in_memory(
    cfg: Config, plan: list[_Planned], full: FeatureSet, res_path: Path, out_dir: Path, keep: np.ndarray | None
) -> list[HeadResult]:
    share = 1.0  # of the extraction time: a curve point is charged for the images it needed
    if keep is not None:
        rows = sum(len(full.splits[s].y) for s in ("train", "val", "test"))
        full = full.subset_train(keep)
        share = sum(len(full.splits[s].y) for s in ("train", "val", "test")) / rows
    labels = {p.label for p in plan}
    layer_sets = [v for v in layer_select.variants(cfg.heads.layers, full.layer_names()) if v[0] in labels]

    meta = None
    if any(p.features != "image" for p in plan):
        meta = metadata_table(cfg.metadata_path, full, cfg.heads.meta_columns, cfg.data.id_column)

    sel = None
    wants_auto = any(layers is None for _, layers in layer_sets)
    if wants_auto or (keep is None and len(full.layer_names()) > 1 and len(full.splits["val"].y)):
        sel = layer_select.select(full, greedy=wants_auto)  # per-layer scores for the report, and auto's choice
        if keep is None:
            write_json_atomic(out_dir / "layers.json", run_record(cfg, "layers", **dataclasses.asdict(sel)))

    out: list[HeadResult] = []
    for label, layers in layer_sets:
        select_seconds = 0.0
        if layers is None:
            layers, select_seconds = sel.chosen, sel.seconds
        fs = full.with_layers(layers, cfg.heads.train_views)
        mine = [p for p in plan if p.label == label]
        variants: dict[str, tuple[dict[str, SplitData], list[str]]] = {}
        if any(p.features == "image" for p in mine):
            variants["image"] = (fs.splits, None)
        if any(p.features != "image" for p in mine):
            fused = fuse(fs, meta, cfg.heads.metadata_missing)
            log.info("metadata: %d columns after encoding (%s)", len(fused[1].names), ", ".join(fused[1].names[:8]))
            for f in {p.features for p in mine if p.features != "image"}:
                variants[f] = fused
        widths = [w for _, w in fs.blocks]
        for p in mine:
            splits, encoding = variants[p.features]
            log.info(
                "fitting %s on %s [%s] (%d train, %d-dim)",
                p.name,
                fs.backbone,
                ", ".join(layers),
                len(splits["train"].y),
                splits["train"].X.shape[1],
            )
            model, r = fit_head(p.head, p.features, splits, widths, cfg, fs.embedding_dim, desc=p.name)
            r.tune_seconds += select_seconds  # auto's layer search is part of tuning
            r.layers, r.layer_names = label, list(layers)
            if label != layer_select.LAST:
                r.params["layers"] = list(layers)
            test = splits["test"]
            pred_path = _save(
                out_dir / p.name, ".joblib", partial(joblib.dump, model), test.ids, test.y, r.test_pred, fs.class_names
            )
            row = _row(cfg, fs, r, len(splits["train"].y), len(test.y), pred_path, share)
            results.upsert(res_path, row)
            _sidecar(out_dir / p.name, r, fs, cfg, encoding, inputs_key=p.key, row=row)  # last: it vouches
            log.info(
                "  %-28s val %.4f  test %.4f  %s  tune %.1fs + fit %.1fs",
                p.name,
                r.val_accuracy,
                r.scores["test_accuracy"],
                _params_text(r.params),
                r.tune_seconds,
                r.fit_seconds,
            )
            out.append(r)
        del fs, variants  # before the next layer set's arrays
    return out


def _row(cfg: Config, fs, r: HeadResult, n_train: int, n_test: int, pred_path: Path, share: float = 1.0) -> dict:
    """The head's results row (``fs``: anything with backbone, extract_seconds and attrs); ``n_train`` is
    the training images it was given (``r.n_train``: those it was fitted on, after any subsample or refit)."""
    return {
        "dataset": cfg.dataset_name,
        "backbone": fs.backbone,
        "method": r.head,
        "features": r.features,
        "layers": r.layers,
        "val_accuracy": r.val_accuracy,
        **r.scores,
        "train_seconds": r.tune_seconds + r.fit_seconds,
        "tune_seconds": r.tune_seconds,
        "fit_seconds": r.fit_seconds,
        "extract_seconds": fs.extract_seconds * share,
        "n_train": n_train,
        "n_test": n_test,
        "params": json.dumps(r.params),
        "weights": fs.attrs.get("weights", ""),
        "predictions": str(pred_path.relative_to(cfg.artifacts)),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _run_streaming(
    cfg: Config, plan: list[_Planned], info: CacheInfo, res_path: Path, out_dir: Path
) -> list[HeadResult]:
    """``linear_probe`` per layer set, image features only, nothing loaded whole."""
    from pipeline import probe

    if any(f != "image" for f in cfg.heads.features) and cfg.metadata_path is not None:
        log.info("linear_probe fits image features only; the metadata feature sets are the in-memory heads'")
    if "auto" in cfg.heads.layers:
        log.warning("notice: linear_probe skips --layers auto (its selection needs the features in memory)")
    out = []
    for p in plan:
        layers = p.layers
        log.info("fitting %s on %s [%s], streamed from %s", p.name, info.backbone, ", ".join(layers), info.path.name)
        res, streams = probe.fit_probe(
            info.path,
            layers,
            list(cfg.heads.probe_decays),
            len(info.class_names),
            batch_size=cfg.heads.batch_size,
            max_epochs=cfg.heads.probe_epochs,
            seed=cfg.data.seed,
            desc=p.name,
        )
        tuning.edge_values(list(cfg.heads.probe_decays), res.decay, "decay", extend=False)  # says so, if on it
        test = streams["test"]
        pred = probe.predict(res.model, test) if test.n else np.zeros(0, dtype=np.int64)
        params = {"decay": res.decay, "epochs": res.epochs}
        if p.label != layer_select.LAST:
            params["layers"] = list(layers)
        r = HeadResult(
            "linear_probe",
            "image",
            params,
            res.val_accuracy,
            results.scores(test.labels, pred),
            res.seconds,
            0.0,
            streams["train"].n,
            pred,
            p.label,
            list(layers),
        )
        pred_path = _save(out_dir / p.name, ".keras", res.model.save, test.ids(), test.labels, pred, info.class_names)
        row = _row(cfg, info, r, streams["train"].n, test.n, pred_path)
        results.upsert(res_path, row)
        _sidecar(out_dir / p.name, r, info, cfg, None, val_per_decay=res.val_per_decay, inputs_key=p.key, row=row)
        log.info(
            "  %-28s val %.4f  test %.4f  decay=%g epochs=%d  %.1fs",
            p.name,
            r.val_accuracy,
            r.scores["test_accuracy"],
            res.decay,
            res.epochs,
            res.seconds,
        )
        for st in streams.values():
            st.close()
        out.append(r)
    return out


def _save(stem: Path, ext: str, write_model, ids, y_true, y_pred, class_names: list[str]) -> Path:
    """Model and test predictions written to temporary files first; only when both are whole is the old
    record removed and are they renamed into place. A full disk or a kill while writing leaves the previous
    result (model, predictions, record, results row) exactly as it was. Returns the predictions' path."""
    pred_path = stem.with_name(stem.name + ".predictions.csv")
    with atomic_path(stem.with_name(stem.name + ext), suffix=ext) as tmp_model, atomic_path(pred_path) as tmp_pred:
        write_model(tmp_model)
        results.write_predictions(tmp_pred, ids, y_true, y_pred, class_names)
        uptodate.invalidate(stem.with_name(stem.name + ".json"))
    return pred_path


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items() if k != "layers")


def _sidecar(stem: Path, r: HeadResult, fs, cfg: Config, encoding: MetaEncoding | None, **extra) -> None:
    """The head's record, written last: it vouches for the model beside it, and says everything ``predict``
    needs to apply it (layers, classes, the metadata encoding)."""
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
            metadata_columns=encoding.names if encoding else [],
            metadata_encoding=dataclasses.asdict(encoding) if encoding else None,
            layers=r.layers,
            layer_names=r.layer_names,
            train_views=cfg.heads.train_views,
            class_names=fs.class_names,
            cache={
                "path": str(fs.path),
                "key": {k: fs.attrs.get(k) for k in KEY_FIELDS},
                "dataset_fingerprint": fs.attrs.get("dataset_fingerprint"),
                "weights": fs.attrs.get("weights"),
                "extract_seconds": fs.extract_seconds,
            },
            **extra,
        ),
    )


def _print_table(rows: list[HeadResult], backbone: str, res_path: Path) -> None:
    print(f"\n{'head':30s} {'features':16s} {'layers':8s} {'val acc':>8s} {'test acc':>9s} {'train s':>8s}  params")
    for r in rows:
        print(
            f"{head_name(r.head, r.features, r.layers):30s} {r.features:16s} {r.layers[:8]:8s} {r.val_accuracy:8.4f} "
            f"{r.scores['test_accuracy']:9.4f} {r.tune_seconds + r.fit_seconds:8.1f}  {_params_text(r.params)}"
        )
    print(f"({backbone}; results in {res_path})")
