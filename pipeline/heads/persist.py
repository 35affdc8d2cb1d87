"""A head's artifacts: the fitted model and its test predictions (staged, then renamed together), the
record that vouches for them and says what ``predict`` needs, and the reuse of a saved result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import results, uptodate
from pipeline.artifacts import atomic_path, run_record, write_json_atomic
from pipeline.config import Config
from pipeline.extract.cache.key import recorded
from pipeline.heads.features import MetaEncoding
from pipeline.heads.fit import HeadResult
from pipeline.results import head_name


def save_staged(stem: Path, ext: str, write_model, ids, y_true, y_pred, class_names: list[str]) -> Path:
    """Model and test predictions written to temporary files first; only when both are whole is the old
    record removed and are they renamed into place. A full disk or a kill while writing leaves the previous
    result (model, predictions, record, results row) exactly as it was. Returns the predictions' path."""
    pred_path = stem.with_name(stem.name + ".predictions.csv")
    with atomic_path(stem.with_name(stem.name + ext), suffix=ext) as tmp_model, atomic_path(pred_path) as tmp_pred:
        write_model(tmp_model)
        results.write_predictions(tmp_pred, ids, y_true, y_pred, class_names)
        uptodate.invalidate(stem.with_name(stem.name + ".json"))
    return pred_path


def result_row(cfg: Config, fs, r: HeadResult, n_train: int, n_test: int, pred_path: Path, share: float = 1.0):
    """The head's results row (``fs``: anything with a label, extract_seconds and attrs), filed under the
    cache's label (backbone@variant), so variants of one backbone are rows of their own; ``n_train`` is
    the training images it was given (``r.n_train``: those it was fitted on, after any subsample or refit)."""
    return results.row(
        dataset=cfg.dataset_name,
        backbone=fs.label,
        method=r.head,
        features=r.features,
        layers=r.layers,
        val_accuracy=r.val_accuracy,
        scores=r.scores,
        tune_seconds=r.tune_seconds,
        fit_seconds=r.fit_seconds,
        extract_seconds=fs.extract_seconds * share,
        n_train=n_train,
        n_test=n_test,
        params=r.params,
        weights=fs.attrs.get("weights", ""),
        predictions=str(pred_path.relative_to(cfg.artifacts)),
    )


def write_record(stem: Path, r: HeadResult, fs, cfg: Config, encoding: MetaEncoding | None, **extra) -> None:
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
                "key": recorded(fs.attrs),
                "dataset_fingerprint": fs.attrs.get("dataset_fingerprint"),
                "weights": fs.attrs.get("weights"),
                "extract_seconds": fs.extract_seconds,
            },
            **extra,
        ),
    )


def from_record(saved: dict) -> HeadResult:
    names = ("head", "features", "params", "val_accuracy", "scores", "tune_seconds", "fit_seconds", "n_train")
    return HeadResult(
        **{k: saved[k] for k in names}, test_pred=None, layers=saved["layers"], layer_names=saved["layer_names"]
    )


def params_text(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items() if k != "layers")


def print_table(rows: list[HeadResult], backbone: str, res_path: Path) -> None:
    print(f"\n{'head':30s} {'features':16s} {'layers':8s} {'val acc':>8s} {'test acc':>9s} {'train s':>8s}  params")
    for r in rows:
        print(
            f"{head_name(r.head, r.features, r.layers):30s} {r.features:16s} {r.layers[:8]:8s} {r.val_accuracy:8.4f} "
            f"{r.scores['test_accuracy']:9.4f} {r.tune_seconds + r.fit_seconds:8.1f}  {params_text(r.params)}"
        )
    print(f"({backbone}; results in {res_path})")
