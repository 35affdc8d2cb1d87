"""Reading a cache: whole into memory (``load_features``: one packed float32 array per split, the layer
blocks are views of it), its attributes alone (``check_cache``, ``CacheInfo``), or its shapes
(``cache_shape``, for the memory budget). A file HDF5 cannot read is one line naming it and the command
that rebuilds it, never a traceback from inside h5py.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.data import SPLITS
from pipeline.errors import PipelineError, first_line
from pipeline.extract.cache.key import VIEWS

LAST = "last"  # the final embedding, as a layer name


def tap_label(k: int, name: str, shape: list[int] | None = None) -> str:
    """``tap k`` (what ``--layers tapK`` names), the block when the name has one (the Lite builders'
    ``_blocks__11___bn0__relu6``), and the channels and resolution when the cache recorded them."""
    block = re.search(r"blocks?_*(\d+)", name)
    where = f"block {block.group(1)}" if block else name
    if shape and len(shape) == 3:
        where += f" ({shape[2]} ch, {shape[0]}×{shape[1]})"
    elif shape:
        where += f" ({shape[-1]} ch)"
    return f"tap {k}: {where}"


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
    def label(self) -> str:
        """What the heads on this cache are filed and reported under: the file's stem, the backbone and its
        extraction variant (``efficientnet_lite0@112px-grid2``; a cache from before variants: the backbone)."""
        return Path(self.path).stem

    @property
    def extract_seconds(self) -> float:
        return float(self.attrs.get("extract_seconds", 0.0))

    @property
    def tap_layers(self) -> list[str]:
        return json.loads(self.attrs.get("tap_layers", "[]"))

    def layer_labels(self) -> dict[str, str]:
        """What a reader calls each cached layer: ``last`` -> "final embedding", a tap -> "tap 4: block 11
        (672 ch, 7×7)"; the raw Keras names stay the keys (and what ``--layers`` matches besides ``tapN``)."""
        shapes = json.loads(self.attrs.get("tap_shapes", "{}"))
        labels = {LAST: "final embedding"}
        for k, name in enumerate(self.tap_layers, 1):
            labels[name] = tap_label(k, name, shapes.get(name))
        return labels


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
        if VIEWS in f:
            g = f[VIEWS]
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


def cache_shape(path: Path) -> tuple[dict[str, int], int]:
    """(rows per split, feature width of last + every tap), from the cache's metadata only."""
    with reading(path) as f:
        taps = json.loads(f.attrs.get("tap_layers", "[]"))
        rows = {s: f[s]["embeddings"].shape[0] for s in SPLITS}
        width = f["train"]["embeddings"].shape[1] + sum(f["train"]["taps"][n].shape[1] for n in taps)
    return rows, width
