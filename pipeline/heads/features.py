"""Per-image tabular metadata fused with cached features: [embedding | encoded metadata] per split.

Alignment is always by image id, never by row order: the cache stores each
embedding's id, and the metadata table is indexed by the same ids. The encoding (categories, fill
values, the missing-value policy) is kept as a ``MetaEncoding`` so ``predict`` encodes new rows alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import SPLITS, load_metadata
from pipeline.errors import PipelineError
from pipeline.extract.cache.reader import FeatureSet, SplitData

log = logging.getLogger(__name__)

LABEL_LIKE = {"label", "labels", "class", "class_name", "target", "y", "category"}
MISSING_POLICIES = ("error", "drop", "impute")


def _label_columns(meta: pd.DataFrame, fs: FeatureSet) -> list[str]:
    """Columns that are, or encode one-to-one, the class label: never features."""
    train = fs.splits["train"]
    known = meta.reindex(train.ids)
    y = pd.Series(train.y, index=known.index)
    bad = []
    for col in meta.columns:
        values = known[col]
        if str(col).lower() in LABEL_LIKE:
            bad.append(col)
            continue
        ok = values.notna()
        if ok.sum() < 2 or values[ok].nunique() < 2:
            continue
        v, t = values[ok], y[ok]
        if v.groupby(t).nunique().max() == 1 and t.groupby(v).nunique().max() == 1:  # a relabelling of y
            bad.append(col)
    return bad


def metadata_table(
    meta_path: Path, fs: FeatureSet, columns: tuple[str, ...] = (), id_column: str | None = None
) -> pd.DataFrame:
    """The metadata columns to fuse, indexed by id, with the label kept out."""
    meta = load_metadata(meta_path, fs.all_ids(), id_column, dataset_name=fs.path.parent.name)
    label_cols = _label_columns(meta, fs)
    if columns:
        unknown = [c for c in columns if c not in meta.columns]
        if unknown:
            raise PipelineError(f"metadata has no column(s) {', '.join(unknown)} (has: {', '.join(meta.columns[:12])})")
        leaking = [c for c in columns if c in label_cols]
        if leaking:
            raise PipelineError(
                f"metadata column(s) {', '.join(leaking)} encode the class label; they cannot be features"
            )
        return meta[list(columns)]
    if label_cols:
        log.info("leaving out metadata column(s) that encode the label: %s", ", ".join(map(str, label_cols)))
    return meta.drop(columns=label_cols)


def encode_metadata(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Numeric columns as they are, categorical ones one-hot (categories from the whole table).

    Returns the encoded table and the names of its numeric (not one-hot) columns.
    A missing categorical value stays NaN in its one-hot columns, so the
    missing-value policy sees it instead of an all-zero row.
    """
    numeric = meta.select_dtypes(include=["number", "bool"]).astype(float)
    categorical = meta.drop(columns=numeric.columns)
    parts = [numeric]
    if len(categorical.columns):
        dummies = pd.get_dummies(categorical.astype("string"), prefix_sep="=", dtype=float)
        for col in categorical.columns:
            cols = [c for c in dummies.columns if c.startswith(f"{col}=")]
            dummies.loc[categorical[col].isna().to_numpy(), cols] = np.nan
        parts.append(dummies)
    encoded = pd.concat(parts, axis=1)
    encoded.columns = list(map(str, encoded.columns))
    return encoded, list(map(str, numeric.columns))


@dataclass
class MetaEncoding:
    """How metadata became feature columns at training time, saved with each metadata head so that
    ``predict`` encodes new images' rows exactly as the training images' were."""

    columns: list[str]  # the raw metadata columns used
    names: list[str]  # the encoded columns, in order (numeric ones, then one-hot ``col=value``)
    numeric: list[str]
    fill: dict[str, float]  # imputation values: the training median (numeric), 0 (one-hot: "unknown")
    missing: str  # the --metadata-missing policy

    def encode(self, meta: pd.DataFrame) -> pd.DataFrame:
        """The encoded block of ``meta`` (indexed by id): categories never seen in training are all-zero
        ("unknown"); a missing value stays NaN for the policy to handle."""
        encoded, _ = encode_metadata(meta[self.columns])
        block = encoded.reindex(columns=self.names)
        onehot = [n for n in self.names if n not in self.numeric]
        seen = encoded.columns.intersection(onehot)
        block[[n for n in onehot if n not in seen]] = 0.0
        for col in self.columns:  # a missing categorical value is missing in every one-hot column of its group
            if col not in self.numeric:
                group = [n for n in onehot if n.startswith(f"{col}=")]
                block.loc[meta[col].isna().to_numpy(), group] = np.nan
        return block


def fuse(fs: FeatureSet, meta: pd.DataFrame, missing: str = "error") -> tuple[dict[str, SplitData], MetaEncoding]:
    """Concatenate [embedding | metadata] per split, joined by id.

    ``missing``: ``error`` names the first images lacking a row or value; ``drop``
    removes them from every split; ``impute`` fills with the training median
    (numeric) or an all-zero one-hot (categorical, i.e. "unknown").
    """
    if missing not in MISSING_POLICIES:
        raise PipelineError(f"--metadata-missing must be one of {', '.join(MISSING_POLICIES)}, not {missing}")
    encoded, numeric = encode_metadata(meta)
    names = list(encoded.columns)
    fill = pd.Series(0.0, index=names)
    fill[numeric] = encoded.reindex(fs.splits["train"].ids)[numeric].median().fillna(0.0)
    spec = MetaEncoding(list(map(str, meta.columns)), names, numeric, fill.astype(float).to_dict(), missing)
    out: dict[str, SplitData] = {}
    for s in SPLITS:
        d = fs.splits[s]
        block = encoded.reindex(d.ids)
        keep = apply_missing(block, d.ids, spec, s)
        out[s] = SplitData(
            np.hstack([d.X[keep], block[keep].fillna(spec.fill).to_numpy(np.float32)]), d.y[keep], d.ids[keep]
        )
    return out, spec


def apply_missing(block: pd.DataFrame, ids: np.ndarray, spec: MetaEncoding, where: str) -> np.ndarray:
    """The rows to keep under the policy (all of them for impute, which fills later); ``error`` raises."""
    incomplete = block.isna().any(axis=1).to_numpy()
    if not incomplete.any():
        return np.ones(len(block), dtype=bool)
    no_row = block.isna().all(axis=1).to_numpy()
    bad = np.asarray(ids)[incomplete]
    what = "no metadata row" if no_row[incomplete].all() else "missing metadata values"
    if spec.missing == "error":
        raise PipelineError(
            f"{incomplete.sum()} {where} images have {what}, e.g. {', '.join(bad[:5])} "
            f"(use --metadata-missing drop|impute to proceed)"
        )
    if spec.missing == "drop":
        log.warning("warning: dropping %d %s images with %s, e.g. %s", len(bad), where, what, ", ".join(bad[:3]))
        return ~incomplete
    log.warning("warning: imputing metadata for %d %s images, e.g. %s", len(bad), where, ", ".join(bad[:3]))
    return np.ones(len(block), dtype=bool)
