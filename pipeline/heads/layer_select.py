"""`--layers`: which cached layers a head reads, and `auto`: choosing them on the validation split.

A layer set is a list of blocks: ``last`` (the final embedding) and tap layer
names. Each block is standardised and scaled to the same total variance, so a
16-wide early tap and the 1,280-wide final embedding have an equal say, as the
metadata block does at weight 1 (Head2Toe scales each layer to unit norm for
the same reason).

``auto`` scores each block alone, then greedily adds the block that most
improves validation accuracy until none does. The scorer is ridge regression
on one-hot targets with its penalty picked on val: every subset and every
penalty comes from one Gram matrix of the training blocks (an eigendecomposition
of a sub-matrix per subset), so selection costs a few seconds even at 50,000
images. Test accuracy per block is computed for the report only.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import SPLITS
from pipeline.errors import PipelineError
from pipeline.estimators import tuning
from pipeline.extract.cache.reader import LAST

log = logging.getLogger(__name__)

ALL = "all"
AUTO = "auto"
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x n_train
_CHUNK = 8192


def variants(requested: tuple[str, ...], available: list[str]) -> list[tuple[str, list[str] | None]]:
    """(label, blocks) per requested layer set; ``auto``'s blocks are chosen later (None).

    ``last``, ``all`` and ``auto`` are each a set of their own; any other names (raw Keras names, or
    ``tapK``: the K-th cached tap, as the report labels it) together form one set, labelled by the raw
    names joined with commas.
    """
    out: list[tuple[str, list[str] | None]] = []
    names = []
    taps = [n for n in available if n != LAST]
    for r in requested:
        alias = re.fullmatch(r"tap\s*(\d+)", r)
        if alias and 1 <= int(alias.group(1)) <= len(taps):
            r = taps[int(alias.group(1)) - 1]
        if r == LAST:
            out.append((LAST, [LAST]))
        elif r == ALL:
            out.append((ALL, list(available)))
        elif r == AUTO:
            out.append((AUTO, None))
        else:
            names.append(r)
    if names:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise PipelineError(
                f"the cache has no layer(s) {', '.join(unknown)} (has: {', '.join(available)}); "
                "extract with --taps to cache them"
            )
        out.append((",".join(names), names))
    if any(label != LAST for label, _ in out) and available == [LAST]:
        log.warning("warning: the cache holds no taps (extracted with --taps none?): --layers all/auto = last")
    unique: dict[str, list[str] | None] = {}
    for label, blocks in out:
        unique.setdefault(label, blocks)
    return list(unique.items())


@dataclass
class Selection:
    chosen: list[str]
    val_accuracy: float
    per_layer: list[dict] = field(default_factory=list)  # {layer, label, width, val_accuracy, test_accuracy}
    steps: list[dict] = field(default_factory=list)  # greedy path: {layers, val_accuracy}
    seconds: float = 0.0
    scorer: str = "ridge (one-hot targets, penalty picked on val)"
    greedy: bool = True  # False: only each layer alone was scored (``chosen`` is the best single layer)


class _Ridge:
    """Ridge scores of any subset of blocks from one Gram matrix of the standardised train blocks.

    The Gram matrix is accumulated from raw float32 chunks in float64 and standardised afterwards
    (centre, then scale rows and columns), so no standardised copy of the training matrix is made."""

    def __init__(self, fs, layers: list[str]):
        ref = fs.embedding_dim
        self.fs, self.layers, self.slices, start = fs, list(layers), {}, 0
        means, scales = [], []
        for name in layers:
            tr = fs.block("train", name)
            mean, var = tuning.column_stats(tr)
            std = np.sqrt(var)
            std[std == 0] = 1.0
            means.append(mean)
            scales.append(np.sqrt(ref / tr.shape[1]) / std)
            self.slices[name] = np.arange(start, start + tr.shape[1])
            start += tr.shape[1]
        self.mean, self.scale = np.concatenate(means), np.concatenate(scales)
        y = fs.splits["train"].y
        n_classes = int(max(fs.splits[s].y.max() for s in SPLITS if len(fs.splits[s].y))) + 1
        T = np.eye(n_classes, dtype=np.float32)[y]
        self.prior = T.mean(axis=0)
        T -= self.prior
        chunks = (np.hstack([fs.block("train", n)[s : s + _CHUNK] for n in layers]) for s in range(0, len(y), _CHUNK))
        gram, xty = tuning.gram_products(chunks, T)
        gram -= len(y) * np.outer(self.mean, self.mean)
        self.gram = gram * self.scale[:, None] * self.scale[None, :]
        self.xty = xty * self.scale[:, None]  # the centring term vanishes: T's columns sum to zero
        self.n = len(y)

    def _standardised(self, split: str, layers: list[str], idx: np.ndarray) -> np.ndarray:
        X = np.hstack([self.fs.block(split, n) for n in layers]).astype(np.float32)
        X -= self.mean[idx].astype(np.float32)
        X *= self.scale[idx].astype(np.float32)
        return X

    def score(self, layers: list[str]) -> tuple[float, float]:
        """(val accuracy, test accuracy) at the penalty best on val."""
        layers = [n for n in self.layers if n in layers]
        idx = np.concatenate([self.slices[n] for n in layers])
        evals, evecs = np.linalg.eigh(self.gram[np.ix_(idx, idx)])
        proj = evecs.T @ self.xty[idx]
        evecs32 = evecs.astype(np.float32)
        val = self._standardised("val", layers, idx) @ evecs32
        y = {s: self.fs.splits[s].y for s in ("val", "test")}
        best = (-1.0, None)
        for a in RIDGE_ALPHAS:
            w = proj / (np.maximum(evals, 0) + a * self.n)[:, None]
            acc = float(np.mean(np.argmax(val @ w + self.prior, 1) == y["val"]))
            if acc > best[0]:
                best = (acc, w)
        test = self._standardised("test", layers, idx) @ evecs32
        return best[0], float(np.mean(np.argmax(test @ best[1] + self.prior, 1) == y["test"]))


def select(fs, greedy: bool = True) -> Selection:
    """Each block scored alone and, with ``greedy``, forward selection of blocks on val (needs a validation
    split). Without it only the per-layer scores the report charts are computed (the greedy steps cost the
    most: one eigendecomposition per trial)."""
    layers = fs.layer_names()
    if len(fs.splits["val"].y) == 0:
        raise PipelineError("--layers auto picks layers on the validation split, and this dataset has none")
    t0 = time.perf_counter()
    ridge = _Ridge(fs, layers)
    per_layer = []
    labels = fs.layer_labels()
    for name in layers:
        val, test = ridge.score([name])
        width = fs.block("train", name).shape[1]
        per_layer.append(
            {"layer": name, "label": labels[name], "width": width, "val_accuracy": val, "test_accuracy": test}
        )
    order = sorted(per_layer, key=lambda r: -r["val_accuracy"])
    chosen, best = [order[0]["layer"]], order[0]["val_accuracy"]
    steps = [{"layers": list(chosen), "val_accuracy": best}]
    while greedy and len(chosen) < len(layers):
        trials = [(ridge.score(chosen + [n])[0], n) for n in layers if n not in chosen]
        acc, name = max(trials)
        if acc <= best:
            break
        chosen.append(name)
        best = acc
        steps.append({"layers": list(chosen), "val_accuracy": acc})
    chosen = [n for n in layers if n in chosen]  # network order, for stable names
    sel = Selection(chosen, best, per_layer, steps, time.perf_counter() - t0, greedy=greedy)
    alone = ", ".join(f"{r['label']} {r['val_accuracy']:.3f}" for r in per_layer)
    if greedy:
        what = ", ".join(labels[n] for n in chosen)
        log.info("layers auto: chose %s (ridge val %.4f; alone: %s) in %.1fs", what, best, alone, sel.seconds)
    else:
        log.info("ridge val accuracy per layer: %s (%.1fs)", alone, sel.seconds)
    return sel
