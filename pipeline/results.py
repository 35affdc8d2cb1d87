"""The one results table every training stage appends to: artifacts/results/<dataset>.csv.

One row per (dataset, backbone, method, features, layers, n_train); rerunning a
configuration replaces its row instead of duplicating it. ``n_train`` is the number of
training images the method was given: the whole training split, or a learning-curve subset.

Several stages write it, possibly at once (``make -j2 demo``, a second terminal): every
read-modify-write holds the table's OS lock, and the new table replaces the old by an atomic rename.
A table that no longer parses (edited by hand) is named with its bad line instead of being rewritten.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from pipeline import lock
from pipeline.artifacts import atomic_path
from pipeline.errors import PipelineError, first_line

KEY = ["dataset", "backbone", "method", "features", "layers", "n_train", "seed"]
# seed: empty for a run at the configured seed (every row before seeds existed); a training seed's number for
# the fine-tune's extra seeds (``finetune --seeds N``), which the report shows as a spread, not as methods
OPTIONAL_KEYS = ("layers", "seed")  # added after tables existed: absent in an older table, filled on reading
FINETUNED = ("finetune", "frozen_dense")  # trained end to end on images (frozen_dense: phase 1 of the fine-tune)
COLUMNS = KEY + [
    "val_accuracy",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_macro_f1",
    "train_seconds",
    "tune_seconds",
    "fit_seconds",
    "extract_seconds",
    "n_test",
    "params",
    "weights",
    "predictions",
    "timestamp",
]


def head_name(head: str, features: str, layers: str = "last") -> str:
    """How a head's artifacts are named: ``logreg``, ``logreg+meta``, ``logreg@auto+meta_norm``;
    a set of named layers is ``@`` + a short hash of the names."""
    at = ""
    if layers and layers != "last":
        at = "@" + (layers if layers in ("all", "auto") else hashlib.sha1(layers.encode()).hexdigest()[:8])
    return head + at + {"image": "", "image+meta": "+meta", "image+meta_norm": "+meta_norm"}[features]


def subset_suffix(n_train: int | None) -> str:
    """How a learning-curve point's artifacts are told apart from the full-data run's: ``-n300``."""
    return f"-n{n_train}" if n_train else ""


def row(
    *,
    dataset: str,
    backbone: str,
    method: str,
    val_accuracy: float,
    scores: dict,
    tune_seconds: float,
    fit_seconds: float,
    n_train: int,
    n_test: int,
    params: dict,
    weights: str,
    predictions: str,
    features: str = "image",
    layers: str = "last",
    extract_seconds: float = 0.0,
    seed: int | None = None,
) -> dict:
    """One results row, for a head and a fine-tune alike: ``train_seconds`` is tuning + the kept fit, and
    ``extract_seconds`` the share of the cache's extraction the method is charged (0 for fine-tunes)."""
    return {
        "dataset": dataset,
        "backbone": backbone,
        "method": method,
        "features": features,
        "layers": layers,
        "val_accuracy": val_accuracy,
        **scores,
        "train_seconds": tune_seconds + fit_seconds,
        "tune_seconds": tune_seconds,
        "fit_seconds": fit_seconds,
        "extract_seconds": extract_seconds,
        "n_train": n_train,
        "n_test": n_test,
        "params": json.dumps(params),
        "weights": weights,
        "predictions": predictions,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        **({"seed": seed} if seed is not None else {}),
    }


def extra_seed(table: pd.DataFrame) -> pd.Series:
    """Rows of the fine-tune's extra training seeds (not methods of their own)."""
    if "seed" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["seed"].notna()


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
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not a valid results table: {first_line(e)}; {_FIX}") from None
    missing = [k for k in KEY if k not in OPTIONAL_KEYS and k not in table.columns]
    if missing:
        raise PipelineError(f"{path} is not a valid results table: no column(s) {', '.join(missing)}; {_FIX}")
    bad = table[table[["dataset", "backbone", "method"]].isna().any(axis=1)]
    if len(bad):
        line = int(bad.index[0]) + 2  # the header is line 1
        raise PipelineError(f"{path} is not a valid results table: line {line} has no dataset/backbone/method; {_FIX}")
    if "seed" not in table.columns:
        table["seed"] = np.nan
    if "layers" not in table.columns:
        table["layers"] = "last"
    table["layers"] = table["layers"].fillna("last")
    return table


_FIX = "fix or delete that line (each stage's rerun adds its rows back), or move the file away"


def _same(a, b) -> bool:
    """Key equality that survives the CSV round trip (3000 vs 3000.0; missing vs NaN)."""
    if pd.isna(a) and pd.isna(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def upsert(path: Path, row: dict) -> pd.DataFrame:
    """Replace the row with the same key (or append), under the table's lock, written atomically."""
    with lock.exclusive(path, announce=False):
        return _upsert(Path(path), row)


def _upsert(path: Path, row: dict) -> pd.DataFrame:
    row = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "layers": "last", **row}
    table = read_results(path)
    if len(table):
        same = np.ones(len(table), dtype=bool)
        for k in KEY:
            same &= np.array([_same(v, row.get(k)) for v in table.get(k, [None] * len(table))], dtype=bool)
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
