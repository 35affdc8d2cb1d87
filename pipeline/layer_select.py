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
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import PipelineError
from pipeline.features import LAST

log = logging.getLogger(__name__)

ALL = "all"
AUTO = "auto"
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x n_train


def variants(requested: tuple[str, ...], available: list[str]) -> list[tuple[str, list[str] | None]]:
    """(label, blocks) per requested layer set; ``auto``'s blocks are chosen later (None).

    ``last``, ``all`` and ``auto`` are each a set of their own; any other names
    together form one set, labelled by the names joined with commas.
    """
    out: list[tuple[str, list[str] | None]] = []
    names = []
    for r in requested:
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
    per_layer: list[dict] = field(default_factory=list)  # {layer, width, val_accuracy, test_accuracy}
    steps: list[dict] = field(default_factory=list)  # greedy path: {layers, val_accuracy}
    seconds: float = 0.0
    scorer: str = "ridge (one-hot targets, penalty picked on val)"


class _Ridge:
    """Ridge scores of any subset of blocks from one Gram matrix of the standardised train blocks."""

    def __init__(self, blocks: dict[str, dict[str, np.ndarray]], y: dict[str, np.ndarray]):
        names = list(blocks)
        self.slices, start = {}, 0
        for n in names:
            w = blocks[n]["train"].shape[1]
            self.slices[n] = np.arange(start, start + w)
            start += w
        Z = {s: np.hstack([blocks[n][s] for n in names]) for s in ("train", "val", "test")}
        n_classes = int(max(v.max() for v in y.values())) + 1
        T = np.eye(n_classes)[y["train"]]
        self.prior = T.mean(axis=0)
        Xt = Z["train"].astype(np.float64)
        self.gram = Xt.T @ Xt
        self.xty = Xt.T @ (T - self.prior)
        self.Z, self.y, self.n = Z, y, len(y["train"])

    def score(self, layers: list[str]) -> tuple[float, float]:
        """(val accuracy, test accuracy) at the penalty best on val."""
        idx = np.concatenate([self.slices[n] for n in layers])
        evals, evecs = np.linalg.eigh(self.gram[np.ix_(idx, idx)])
        proj = evecs.T @ self.xty[idx]
        val = self.Z["val"][:, idx] @ evecs
        best = (-1.0, None)
        for a in RIDGE_ALPHAS:
            w = proj / (np.maximum(evals, 0) + a * self.n)[:, None]
            acc = float(np.mean(np.argmax(val @ w + self.prior, 1) == self.y["val"]))
            if acc > best[0]:
                best = (acc, w)
        test = self.Z["test"][:, idx] @ evecs
        return best[0], float(np.mean(np.argmax(test @ best[1] + self.prior, 1) == self.y["test"]))


def standardised_blocks(fs, layers: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per layer and split: standardised on train, scaled so each block's total variance is the same."""
    ref = fs.embedding_dim
    out = {}
    for name in layers:
        tr = fs.block("train", name)
        mean, std = tr.mean(axis=0), tr.std(axis=0)
        std[std == 0] = 1.0
        scale = np.sqrt(ref / tr.shape[1]) / std
        out[name] = {s: ((fs.block(s, name) - mean) * scale).astype(np.float32) for s in ("train", "val", "test")}
    return out


def select(fs) -> Selection:
    """Greedy forward selection of blocks on val (needs a validation split)."""
    layers = fs.layer_names()
    if len(fs.splits["val"].y) == 0:
        raise PipelineError("--layers auto picks layers on the validation split, and this dataset has none")
    t0 = time.perf_counter()
    ridge = _Ridge(standardised_blocks(fs, layers), {s: fs.splits[s].y for s in ("train", "val", "test")})
    per_layer = []
    for name in layers:
        val, test = ridge.score([name])
        per_layer.append(
            {"layer": name, "width": fs.block("train", name).shape[1], "val_accuracy": val, "test_accuracy": test}
        )
    order = sorted(per_layer, key=lambda r: -r["val_accuracy"])
    chosen, best = [order[0]["layer"]], order[0]["val_accuracy"]
    steps = [{"layers": list(chosen), "val_accuracy": best}]
    while len(chosen) < len(layers):
        trials = [(ridge.score(chosen + [n])[0], n) for n in layers if n not in chosen]
        acc, name = max(trials)
        if acc <= best:
            break
        chosen.append(name)
        best = acc
        steps.append({"layers": list(chosen), "val_accuracy": acc})
    chosen = [n for n in layers if n in chosen]  # network order, for stable names
    sel = Selection(chosen, best, per_layer, steps, time.perf_counter() - t0)
    log.info(
        "layers auto: chose %s (ridge val %.4f; alone: %s) in %.1fs",
        ", ".join(chosen),
        best,
        ", ".join(f"{r['layer']} {r['val_accuracy']:.3f}" for r in per_layer),
        sel.seconds,
    )
    return sel
