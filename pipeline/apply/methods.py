"""Any method the report compares, loaded so that it applies to new images: `predict` and `export` start here.

A head is its fitted scikit-learn pipeline (or the streaming probe's Keras layer) *plus* the feature
model that filled its cache, rebuilt from the cache's key (``pipeline.apply.feature_model``), the layer order
and the metadata encoding from its record. The fine-tune and ``frozen_dense`` are whole Keras models.
Which method is "the answer" is never decided here: without ``--method`` it is the one the report's
verdict recorded in ``artifacts/reports/<dataset>/choice.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backbones, results
from pipeline.errors import PipelineError
from pipeline.extract.cache.reader import LAST
from pipeline.heads.features import MetaEncoding

FINETUNED_FILES = {"finetune": "finetuned", "frozen_dense": "frozen_dense"}


@dataclass
class Method:
    name: str  # the artifact stem: ridge@all, logreg+meta_norm, finetune, finetune-n300, ...
    method: str  # ridge, logreg, ..., finetune, frozen_dense
    backbone: str
    class_names: list[str]
    input_size: int
    model: object  # Keras: raw RGB 0-255 in; the feature model's outputs (a head) or class probabilities
    head: object | None  # the fitted scikit-learn pipeline (None for the fine-tuned models)
    blocks: list[int]  # which of the feature model's outputs the head reads, in its order
    encoding: MetaEncoding | None
    record: dict
    cache: dict | None = None  # a head's cache attributes (its key, the runtime that filled it)
    cache_file: Path | None = None  # and the cache itself

    @property
    def score_kind(self) -> str | None:
        """``p`` (class probabilities), ``score`` (decision values) or None (rbf_svm: libsvm's votes only)."""
        if self.head is None or is_keras(self.head) or hasattr(self.head, "predict_proba"):
            return "p"
        return "score" if hasattr(self.head, "decision_function") else None

    def score_classes(self) -> list[str]:
        """The class of each score column, in order; a binary ``decision_function`` has one column,
        positive for the second class, as in scikit-learn. Empty when there are no scores."""
        if self.score_kind is None:
            return []
        classes = self.class_names
        if self.head is not None and not is_keras(self.head):
            classes = [classes[int(c)] for c in self.head.classes_]
            if self.score_kind == "score" and len(classes) == 2:
                classes = classes[1:]
        return classes

    def score_columns(self) -> list[str]:
        """``p_<class>`` (probabilities) or ``score_<class>`` (decision values) per score column."""
        return [f"{self.score_kind}_{c}" for c in self.score_classes()]

    def apply(self, outs: list[np.ndarray], meta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(predicted class indices, scores or None) for one batch of the model's outputs."""
        if self.head is None:
            probs = np.asarray(outs[0])
            return probs.argmax(axis=1), probs
        X = np.hstack([np.asarray(outs[b], dtype=np.float32) for b in self.blocks])
        if meta is not None:
            X = np.hstack([X, meta.astype(np.float32)])
        if is_keras(self.head):
            probs = np.asarray(self.head(X, training=False))
            return probs.argmax(axis=1), probs
        pred = self.head.predict(X)
        kind = self.score_kind
        scores = None
        if kind == "p":
            scores = self.head.predict_proba(X)
        elif kind == "score":
            scores = np.asarray(self.head.decision_function(X))
            scores = scores[:, None] if scores.ndim == 1 else scores
        return np.asarray(pred, dtype=np.int64), scores


def is_keras(obj) -> bool:
    return type(obj).__module__.startswith("keras")


def choice_path(artifacts: Path, dataset: str) -> Path:
    return Path(artifacts) / "reports" / dataset / "choice.json"


def locate(cfg, method: str | None) -> tuple[str, str]:
    """(what its artifacts are filed under, method name): as given, or the verdict's recorded choice. A head
    is filed under its cache's label (backbone@variant, the cache the configuration selects), a fine-tune
    under the backbone."""
    if method:
        if method.split("-n")[0] in FINETUNED_FILES:
            return backbones.name_for(cfg.backbone.backbone), method
        from pipeline.extract import stage as extract

        return extract.cache_path(cfg).stem, method
    path = choice_path(cfg.artifacts, cfg.dataset_name)
    if not path.exists():
        raise PipelineError(
            f"no recorded choice for {cfg.dataset_name} ({path}): run `make report` first, or name one with --method"
        )
    chosen = json.loads(path.read_text())
    return chosen["backbone"], chosen["name"]


def load(cfg, method: str | None, portable: bool = False) -> Method:
    """The method, loaded; a missing artifact or one made from other data is a one-line error naming the fix.
    ``portable``: a head's feature model from built-in Keras layers only (for export)."""
    backbone, name = locate(cfg, method)
    base = name.split("-n")[0]
    if base in FINETUNED_FILES:
        return _load_finetuned(cfg, backbone.split("@")[0], name, base)
    return _load_head(cfg, backbone, name, portable)


def _load_finetuned(cfg, backbone: str, name: str, base: str) -> Method:
    import keras

    import pipeline.backbones.layers  # noqa: F401  (registers the preprocessing layer the model holds)

    folder = Path(cfg.artifacts) / "models" / cfg.dataset_name
    suffix = name[len(base) :]
    path = folder / f"{backbone}-{FINETUNED_FILES[base]}{suffix}.keras"
    record_path = folder / f"{backbone}-finetuned{suffix}.json"
    if not path.exists() or not record_path.exists():
        raise PipelineError(f"no {name} model for {backbone} on {cfg.dataset_name} ({path}): run `make finetune`")
    record = json.loads(record_path.read_text())
    model = keras.models.load_model(path)
    size = int(model.input_shape[1])
    return Method(name, base, backbone, record["class_names"], size, model, None, [], None, record)


# Heads saved before the package was grouped by stage name their classes' old modules; the classes live on
# (``pipeline.estimators`` itself re-exports every estimator, so that old name needs no entry).
_MOVED = {
    "pipeline.linear": "pipeline.estimators.linear",
    "pipeline.nystroem": "pipeline.estimators.nystroem",
    "pipeline.contract": "pipeline.estimators.contract",
    "pipeline.tuning": "pipeline.estimators.tuning",
}


def _load_joblib(path: Path):
    """A saved head, whichever layout of this package pickled it."""
    import importlib
    import sys

    import joblib

    for old, new in _MOVED.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    return joblib.load(path)


def _load_head(cfg, backbone: str, name: str, portable: bool = False) -> Method:
    from pipeline.apply.feature_model import rebuild

    folder = Path(cfg.artifacts) / "heads" / cfg.dataset_name / backbone
    record_path = folder / f"{name}.json"
    model_path = next((p for p in (folder / f"{name}.joblib", folder / f"{name}.keras") if p.exists()), None)
    if not record_path.exists() or model_path is None:
        known = sorted(p.stem for p in folder.glob("*.json") if p.stem != "layers") if folder.exists() else []
        raise PipelineError(
            f"no method '{name}' for {backbone} on {cfg.dataset_name}: run `make svm` (or `make finetune`)"
            + (f"; known: {', '.join(known + list(FINETUNED_FILES))}" if known else "")
        )
    record = json.loads(record_path.read_text())
    cache = Path(cfg.artifacts) / "features" / cfg.dataset_name / f"{backbone}.h5"
    with backbones.device_policy(False):
        model, attrs = rebuild(cache, Path(cfg.artifacts), portable)
    _check_same_cache(record, attrs, name)
    if model_path.suffix == ".keras":
        import keras

        head = keras.models.load_model(model_path)
    else:
        head = _load_joblib(model_path)
    order = [LAST] + json.loads(attrs.get("tap_layers", "[]"))
    blocks = [order.index(n) for n in record["layer_names"]]
    enc = record.get("metadata_encoding")
    if record["features"] != "image" and not enc:
        raise PipelineError(
            f"{name} was fitted before metadata encodings were saved: refit it with `make svm ARGS=--force`"
        )
    encoding = MetaEncoding(**enc) if enc else None
    size = int(attrs["input_size"])
    return Method(
        name, record["head"], backbone, record["class_names"], size, model, head, blocks, encoding, record, attrs, cache
    )


def _check_same_cache(record: dict, attrs: dict, name: str) -> None:
    """The head's features must come from the cache as it is now: re-extracted data means a refit."""
    saved = record.get("cache", {})
    key = saved.get("key") or {k: saved.get(k) for k in ("dataset_fingerprint", "weights")}
    if any(attrs.get(k) != v for k, v in key.items()):
        raise PipelineError(
            f"{name} was fitted on features the cache no longer holds (it was re-extracted since): "
            "refit it with `make svm`"
        )


def head_row(cfg, method: Method) -> dict | None:
    """The results row the method's test accuracy comes from (what `predict` on the test split reproduces)."""
    table = results.read_results(results.results_path(cfg.artifacts, cfg.dataset_name))
    stem = f"/{method.name}.predictions.csv"
    if method.head is None:  # models/<dataset>/<backbone>-finetuned[-nN].predictions.csv
        suffix = method.name[len(method.method) :]
        stem = f"/{method.backbone}-{FINETUNED_FILES[method.method]}{suffix}.predictions.csv"
    paths = "/" + table["predictions"].astype(str)
    rows = table[paths.str.endswith(stem) & (table["backbone"] == method.backbone)]
    return None if rows.empty else rows.iloc[0].to_dict()
