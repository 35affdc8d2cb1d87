"""`make svm`: tuned, timed scikit-learn heads on cached embeddings (+ metadata).

Linear-probe protocol: standardise, tune C (alpha, k, ...) on the validation split (stratified CV on
train when there is none), evaluate once on test. Tuning and the final fit are timed; the cache's
extraction time is carried along so the report can charge it.

Each head (``heads.registry``) runs per layer set (``--layers``, see ``pipeline.heads.layer_select``) and
feature set; a head whose inputs key matches a saved result is reused. The in-memory heads check the
memory budget (``heads.budget``) and load the cache once; ``linear_probe`` (``pipeline.heads.probe``) streams it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import joblib
import numpy as np

from pipeline import results, uptodate
from pipeline.artifacts import run_record, writable_dir, write_json_atomic
from pipeline.backbones.model_file import name_for
from pipeline.config import Config
from pipeline.data import nested_subset
from pipeline.errors import PipelineError
from pipeline.estimators import tuning
from pipeline.extract import stage as extract
from pipeline.extract.cache.key import inputs_part
from pipeline.extract.cache.reader import CacheInfo, FeatureSet, SplitData, check_cache, load_features, train_labels
from pipeline.heads import budget, layer_select, registry
from pipeline.heads.compose import FEATURE_SETS
from pipeline.heads.features import fuse, metadata_table
from pipeline.heads.fit import HeadResult, fit_head
from pipeline.heads.persist import from_record, params_text, print_table, result_row, save_staged, write_record
from pipeline.results import head_name

log = logging.getLogger(__name__)


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
    cache = inputs_part(attrs)
    plan = []
    for label, layers in layer_select.variants(h.layers, names):
        for f in features:
            for head in h.heads:
                if registry.get(head).streaming and (f != "image" or layers is None):
                    continue
                settings = {k: getattr(h, k) for k in registry.get(head).settings + ("refit", "train_views")}
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


def on_subsets(cfg: Config) -> tuple[Config, Callable[[], FeatureSet], list[str]]:
    """The heads as the learning curve and the forecast fit them, subset after subset: (their config, the
    cache's features read once for every subset and only if one has heads to fit, the streaming heads left
    out: they read the whole cache in batches, not a subset of it)."""
    streamed = [h for h in cfg.heads.heads if registry.get(h).streaming]
    subset_cfg = copy.deepcopy(cfg)
    subset_cfg.heads.heads = tuple(h for h in cfg.heads.heads if h not in streamed)
    backbone = name_for(cfg.backbone.backbone)
    load = functools.cache(lambda: load_features(extract.cache_path(cfg), backbone))
    return subset_cfg, load, streamed


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
    registry.check(cfg.heads.heads)
    backbone = name_for(cfg.backbone.backbone)
    path = extract.cache_path(cfg)
    attrs = check_cache(path, backbone)
    info = CacheInfo(path, attrs)
    keep = None  # the training rows of a learning-curve point, drawn once
    if n_subset is not None:
        labels = train_labels(path)
        keep = nested_subset(labels, n_subset, cfg.data.seed) if n_subset < len(labels) else None
        n_subset = None if keep is None else len(keep)
    res_path = results.results_path(cfg.artifacts, cfg.dataset_name)
    out_dir = writable_dir(Path(cfg.artifacts) / "heads" / cfg.dataset_name / info.label)
    out: list[HeadResult] = []
    todo: list[_Planned] = []
    for p in _plan(cfg, attrs, info.layer_names(), n_subset):
        model = out_dir / (p.name + (".keras" if registry.get(p.head).streaming else ".joblib"))
        saved = uptodate.reusable(
            out_dir / f"{p.name}.json", p.key, model, out_dir / f"{p.name}.predictions.csv", force=cfg.force
        )
        if saved is None or "row" not in saved:
            todo.append(p)
            continue
        results.upsert(res_path, saved["row"])
        log.info("  %-28s up to date (val %.4f, test %.4f), reused; --force to redo", p.name, *_accs(saved))
        out.append(from_record(saved))
    in_memory = [p for p in todo if not registry.get(p.head).streaming]
    if in_memory:
        heads = list(dict.fromkeys(p.head for p in in_memory))
        budget.check(heads, path, cfg.heads, any(p.features != "image" for p in in_memory))
        load = load or (lambda: load_features(path, backbone))
        out += _run_in_memory(cfg, in_memory, load(), res_path, out_dir, keep)
    streaming = [p for p in todo if registry.get(p.head).streaming]
    if streaming:
        out += _run_streaming(cfg, streaming, info, res_path, out_dir)
    print_table(out, info.label, res_path)
    return out


def _accs(saved: dict) -> tuple[float, float]:
    return saved["val_accuracy"], saved["scores"]["test_accuracy"]


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
        for p in mine:
            splits, encoding = variants[p.features]
            out.append(_fit_one(cfg, p, fs, splits, encoding, layers, select_seconds, res_path, out_dir, share))
        del fs, variants  # before the next layer set's arrays
    return out


def _fit_one(cfg: Config, p, fs: FeatureSet, splits, encoding, layers, select_seconds, res_path, out_dir, share):
    """One planned in-memory head: fit, save model + predictions, results row, record (last: it vouches)."""
    log.info(
        "fitting %s on %s [%s] (%d train, %d-dim)",
        p.name,
        fs.label,
        ", ".join(fs.layer_labels().get(n, n) for n in layers),
        len(splits["train"].y),
        splits["train"].X.shape[1],
    )
    widths = [w for _, w in fs.blocks]
    model, r = fit_head(p.head, p.features, splits, widths, cfg.heads, cfg.data.seed, fs.embedding_dim, desc=p.name)
    r.tune_seconds += select_seconds  # auto's layer search is part of tuning
    r.layers, r.layer_names = p.label, list(layers)
    if p.label != layer_select.LAST:
        r.params["layers"] = list(layers)
    test = splits["test"]
    save = partial(joblib.dump, model)
    pred_path = save_staged(out_dir / p.name, ".joblib", save, test.ids, test.y, r.test_pred, fs.class_names)
    row = result_row(cfg, fs, r, len(splits["train"].y), len(test.y), pred_path, share)
    results.upsert(res_path, row)
    write_record(out_dir / p.name, r, fs, cfg, encoding, inputs_key=p.key, row=row)
    log.info(
        "  %-28s val %.4f  test %.4f  %s  tune %.1fs + fit %.1fs",
        p.name,
        r.val_accuracy,
        r.scores["test_accuracy"],
        params_text(r.params),
        r.tune_seconds,
        r.fit_seconds,
    )
    return r


def _run_streaming(
    cfg: Config, plan: list[_Planned], info: CacheInfo, res_path: Path, out_dir: Path
) -> list[HeadResult]:
    """``linear_probe`` per layer set, image features only, nothing loaded whole."""
    from pipeline.heads import probe

    if any(f != "image" for f in cfg.heads.features) and cfg.metadata_path is not None:
        log.info("linear_probe fits image features only; the metadata feature sets are the in-memory heads'")
    if "auto" in cfg.heads.layers:
        log.warning("notice: linear_probe skips --layers auto (its selection needs the features in memory)")
    out = []
    for p in plan:
        layers = p.layers
        names = ", ".join(info.layer_labels().get(n, n) for n in layers)
        log.info("fitting %s on %s [%s], streamed from %s", p.name, info.label, names, info.path.name)
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
            head="linear_probe",
            features="image",
            params=params,
            val_accuracy=res.val_accuracy,
            scores=results.scores(test.labels, pred),
            tune_seconds=res.seconds,
            fit_seconds=0.0,
            n_train=streams["train"].n,
            test_pred=pred,
            layers=p.label,
            layer_names=list(layers),
        )
        stem = out_dir / p.name
        pred_path = save_staged(stem, ".keras", res.model.save, test.ids(), test.labels, pred, info.class_names)
        row = result_row(cfg, info, r, streams["train"].n, test.n, pred_path)
        results.upsert(res_path, row)
        write_record(stem, r, info, cfg, None, val_per_decay=res.val_per_decay, inputs_key=p.key, row=row)
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
