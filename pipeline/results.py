"""The one results table every training stage appends to: artifacts/results/<dataset>.csv.

One row per (dataset, backbone, method, features, layers); rerunning a configuration
replaces its row instead of duplicating it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from pipeline.config import atomic_path

KEY = ["dataset", "backbone", "method", "features", "layers"]
COLUMNS = KEY + [
    "val_accuracy",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_macro_f1",
    "train_seconds",
    "tune_seconds",
    "fit_seconds",
    "extract_seconds",
    "n_train",
    "n_test",
    "params",
    "weights",
    "timestamp",
]


def head_name(head: str, features: str, layers: str = "last") -> str:
    """How a head's artifacts are named: ``logreg``, ``logreg+meta``, ``logreg@auto+meta_norm``;
    a set of named layers is ``@`` + a short hash of the names."""
    at = ""
    if layers and layers != "last":
        at = "@" + (layers if layers in ("all", "auto") else hashlib.sha1(layers.encode()).hexdigest()[:8])
    return head + at + {"image": "", "image+meta": "+meta", "image+meta_norm": "+meta_norm"}[features]


def results_path(artifacts: str | Path, dataset: str) -> Path:
    return Path(artifacts) / "results" / f"{dataset}.csv"


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy plus the imbalance-aware metrics reported beside it."""
    return {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "test_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def read_results(path: Path) -> pd.DataFrame:
    """The table; rows written before layer sets existed read as ``layers = last``."""
    if not Path(path).exists():
        return pd.DataFrame(columns=COLUMNS)
    table = pd.read_csv(path)
    if "layers" not in table.columns:
        table["layers"] = "last"
    table["layers"] = table["layers"].fillna("last")
    return table


def upsert(path: Path, row: dict) -> pd.DataFrame:
    """Replace the row with the same key (or append), written atomically."""
    row = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "layers": "last", **row}
    table = read_results(path)
    if len(table):
        same = np.ones(len(table), dtype=bool)
        for k in KEY:
            same &= table[k].astype(str).to_numpy() == str(row[k])
        table = table[~same]
    new = pd.DataFrame([row])
    table = new if table.empty else pd.concat([table, new], ignore_index=True)
    extra = [c for c in table.columns if c not in COLUMNS]
    table = table.reindex(columns=COLUMNS + extra)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


def write_predictions(path: Path, ids, y_true, y_pred, class_names: list[str]) -> None:
    """Per-image test predictions, so the report can slice them by any metadata column."""
    names = np.asarray(class_names, dtype=object)
    df = pd.DataFrame({"id": ids, "y_true": y_true, "y_pred": y_pred, "true": names[y_true], "pred": names[y_pred]})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
