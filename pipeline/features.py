"""Read embedding caches and build X / y per split, optionally fused with metadata.

Alignment is always by image id, never by row order: the cache stores each
embedding's id, and the metadata table is indexed by the same ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline.data import SPLITS, load_metadata
from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)

LAST = "last"  # the final embedding, as a layer name
LABEL_LIKE = {"label", "labels", "class", "class_name", "target", "y", "category"}
MISSING_POLICIES = ("error", "drop", "impute")


@dataclass
class SplitData:
    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def take(self, mask: np.ndarray) -> SplitData:
        return SplitData(self.X[mask], self.y[mask], self.ids[mask])


class _CacheAttrs:
    """What a cache's attributes say, for anything holding them as ``self.attrs``."""

    @property
    def backbone(self) -> str:
        return str(self.attrs["backbone"])

    @property
    def extract_seconds(self) -> float:
        return float(self.attrs.get("extract_seconds", 0.0))

    @property
    def tap_layers(self) -> list[str]:
        return json.loads(self.attrs.get("tap_layers", "[]"))


@dataclass
class FeatureSet(_CacheAttrs):
    """A cache's splits. ``X`` is the final embedding unless ``with_layers`` chose other blocks;
    ``taps`` holds every cached tap per split, ``views`` the augmented training views."""

    path: Path
    splits: dict[str, SplitData]
    class_names: list[str]
    attrs: dict = field(default_factory=dict)
    taps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> layer -> (N, width)
    views: dict[str, np.ndarray] | None = None  # "last" / layer -> (N * K, width), plus "y", "ids", "view"
    blocks: list[tuple[str, int]] = field(default_factory=list)  # what X holds, in order
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # split -> final embedding (default: X)
    packed: dict[str, np.ndarray] = field(default_factory=dict)  # split -> [last | taps...], blocks are views

    def layer_names(self) -> list[str]:
        """``last`` (the final embedding) and the tapped layers, in network order."""
        return [LAST] + list(self.taps.get("train", {}))

    def block(self, split: str, name: str) -> np.ndarray:
        if name == LAST:
            return self.embeddings[split]
        try:
            return self.taps[split][name]
        except KeyError:
            raise PipelineError(f"{self.path} has no tap '{name}' (has: {', '.join(self.layer_names())})") from None

    @property
    def n_views(self) -> int:
        if self.views is None or not len(self.views["view"]):
            return 0
        return int(self.views["view"].max()) + 1

    def with_layers(self, layers: list[str], train_views: int = 0) -> FeatureSet:
        """A FeatureSet whose X is the named blocks side by side (train + ``train_views`` views)."""
        if train_views > self.n_views:
            raise PipelineError(
                f"--train-views {train_views} but {self.path.name} holds {self.n_views} augmented views of train; "
                f"rerun `make extract` with --views {train_views}"
            )
        splits = {}
        run = self._packed_run(layers)
        for s in SPLITS:
            d = self.splits[s]
            if run is not None:  # a view: no copy of the cache per layer set
                X = self.packed[s][:, run]
            elif len(layers) > 1:
                X = np.hstack([self.block(s, n) for n in layers])
            else:
                X = self.block(s, layers[0])
            splits[s] = SplitData(X, d.y, d.ids)
        if train_views:
            keep = self.views["view"] < train_views
            Xv = np.hstack([self.views[n][keep] for n in layers])
            t = splits["train"]
            splits["train"] = SplitData(
                np.vstack([t.X, Xv]),
                np.concatenate([t.y, self.views["y"][keep]]),
                np.concatenate([t.ids, self.views["ids"][keep]]),
            )
        widths = [(n, self.block("train", n).shape[1]) for n in layers]
        return FeatureSet(
            self.path, splits, self.class_names, self.attrs, self.taps, self.views, widths, self.embeddings, self.packed
        )

    def _packed_run(self, layers: list[str]) -> slice | None:
        """The column slice of the packed arrays that holds exactly ``layers`` in this order, if one does."""
        if not self.packed:
            return None
        names = self.layer_names()
        first = names.index(layers[0]) if layers[0] in names else -1
        if first < 0 or names[first : first + len(layers)] != list(layers):
            return None
        offset = sum(self.block("train", n).shape[1] for n in names[:first])
        return slice(offset, offset + sum(self.block("train", n).shape[1] for n in layers))

    def all_ids(self) -> list[str]:
        return [i for s in SPLITS for i in self.splits[s].ids]

    def subset_train(self, keep: np.ndarray) -> FeatureSet:
        """Only the training rows at ``keep`` (a learning-curve point); val and test untouched.
        The kept rows are copied once into a packed array, the blocks are views of it as usual."""
        X = self.packed["train"][keep]
        t = self.splits["train"]
        embeddings = {**self.embeddings, "train": X[:, : self.embedding_dim]}
        taps = {s: dict(v) for s, v in self.taps.items()}
        start = self.embedding_dim
        for name, block in self.taps.get("train", {}).items():
            taps["train"][name] = X[:, start : start + block.shape[1]]
            start += block.shape[1]
        views = self.views
        if views is not None:
            mask = np.isin(views["ids"], t.ids[keep])
            views = {k: v[mask] for k, v in views.items()}
        splits = {**self.splits, "train": SplitData(embeddings["train"], t.y[keep], t.ids[keep])}
        packed = {**self.packed, "train": X}
        return FeatureSet(self.path, splits, self.class_names, self.attrs, taps, views, [], embeddings, packed)

    @property
    def embedding_dim(self) -> int:
        """Width of the final embedding (the reference width blocks are scaled to)."""
        return self.embeddings["train"].shape[1]

    def __post_init__(self):
        if not self.embeddings:
            self.embeddings = {s: d.X for s, d in self.splits.items()}
        if not self.blocks:
            self.blocks = [(LAST, self.splits["train"].X.shape[1])]


@dataclass
class CacheInfo(_CacheAttrs):
    """A checked cache's attributes, for heads that stream it instead of loading it."""

    path: Path
    attrs: dict

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.attrs["class_names"])

    def layer_names(self) -> list[str]:
        """``last`` and the tapped layers, in network order (as ``FeatureSet.layer_names``)."""
        return [LAST] + self.tap_layers


def train_labels(path: Path) -> np.ndarray:
    """The training split's labels alone (to draw learning-curve subsets before loading anything)."""
    with reading(path) as f:
        return f["train"]["labels"][()]


@contextlib.contextmanager
def reading(path: Path):
    """The cache open for reading. A file HDF5 cannot read (truncated, overwritten) is one line naming it
    and the command that rebuilds it, never a traceback from inside h5py, however deep the read."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"no embedding cache at {path}: run `make extract` (python -m pipeline extract) first")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except (OSError, KeyError, RuntimeError) as e:
        raise PipelineError(
            f"{path} is not a readable HDF5 cache (truncated or corrupt: {first_line(e)}); rerun `make extract` "
            "(python -m pipeline extract), which rebuilds it"
        ) from None


def _checked_attrs(f: h5py.File, path: Path, backbone: str | None) -> dict:
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if not attrs.get("complete"):
        raise PipelineError(f"{path} is incomplete; rerun `make extract` to finish it")
    if backbone is not None and attrs.get("backbone") != backbone:
        raise PipelineError(f"{path} was made by backbone {attrs.get('backbone')}, not {backbone}")
    return attrs


def check_cache(path: Path, backbone: str | None = None) -> dict:
    """The attributes of a complete cache made by ``backbone``; one-line errors otherwise. Loads no rows."""
    path = Path(path)
    with reading(path) as f:
        return _checked_attrs(f, path, backbone)


def load_features(path: Path, backbone: str | None = None) -> FeatureSet:
    """Read a complete cache; refuse a partial one or one made by another backbone."""
    path = Path(path)
    with reading(path) as f:
        attrs = _checked_attrs(f, path, backbone)
        layers = json.loads(attrs.get("tap_layers", "[]"))
        packed, splits, embeddings, taps = {}, {}, {}, {}
        for s in SPLITS:
            sets = [f[s]["embeddings"]] + [f[s]["taps"][n] for n in layers]
            X = np.empty((sets[0].shape[0], sum(d.shape[1] for d in sets)), dtype=np.float32)
            views, start = [], 0
            for d in sets:  # read straight into the packed array: one copy of the cache in memory
                view = X[:, start : start + d.shape[1]]
                if len(X):
                    d.read_direct(X, dest_sel=np.s_[:, start : start + d.shape[1]])
                views.append(view)
                start += d.shape[1]
            packed[s], embeddings[s] = X, views[0]
            if layers:
                taps[s] = dict(zip(layers, views[1:], strict=True))
            splits[s] = SplitData(views[0], f[s]["labels"][()], f[s]["ids"].asstr()[()].astype(object))
        views = None
        if "views" in f:
            g = f["views"]
            ids = g["ids"].asstr()[()].astype(object)
            view = np.empty(len(ids), dtype=np.int64)  # rows are view-major: the k-th row of an id is view k
            seen: dict[str, int] = {}
            for r, i in enumerate(ids):
                view[r] = seen.get(i, 0)
                seen[i] = view[r] + 1
            views = {LAST: g["embeddings"][()], "y": g["labels"][()], "ids": ids, "view": view}
            views.update({n: g["taps"][n][()] for n in layers})
    return FeatureSet(
        path, splits, json.loads(attrs["class_names"]), attrs, taps, views, embeddings=embeddings, packed=packed
    )


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
